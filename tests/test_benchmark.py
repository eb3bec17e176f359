"""train_scripts/benchmark.py on a tiny AiT and its ViT twin, on the CPU."""
import json
import sys
from pathlib import Path

import pytest
import torch

from timm_ait import benchmark  # train_scripts/benchmark.py's code
from timm_ait.benchmark import BenchSettings, ModelSpec, StepTime, Workload

TINY = dict(embed_dim=32, num_heads=2, num_slots=6, slot_dim=8, gwl_heads=2, bottleneck=10, img_size=16)
TINY_ARGS = [f'{k}={v}' for k, v in TINY.items()]


def test_benchmark_prints_every_field(tmp_path, capsys):
    results_file = tmp_path / 'results.json'
    benchmark.main(['-m', 'ait_small_patch4_32', '--model-kwargs', *TINY_ARGS, '--compare', 'gwl=False',
                    '-b', '4', '--num-warm-iter', '1', '--num-bench-iter', '1', '--repeats', '2',
                    '--flops-modules', r'mlp\.read$', '--results-file', str(results_file)])
    table = capsys.readouterr().out
    for mode in ('inference', 'train'):
        for field in ('step (ms), median', 'step (ms), fastest', 'step (ms), range of runs',
                      'step CPU time (ms), median', 'step CPU time (ms), fastest', 'step CPU time (ms), range of runs',
                      'images/s', 'peak memory (MiB)', 'GFLOPs / image'):
            assert f'{mode} {field}' in table
    assert 'inference FLOPs share of' in table
    assert 'train step (ms), median ratio: 95% interval' in table
    assert 'params (M)' in table and 'gwl=False' in table

    results = json.loads(results_file.read_text())
    model, twin = results['models']
    assert model['kwargs'] == TINY and twin['kwargs'] == {**TINY, 'gwl': False}
    assert model['params'] > twin['params']
    for mode in ('inference', 'train'):
        for result in (model, twin):
            assert len(result[mode]['step_ms_runs']) == len(result[mode]['cpu_ms_runs']) == 2
            assert result[mode]['images_per_s'] > 0
            assert result[mode]['peak_memory_mib'] > 0
        ratios = results['ratios'][mode]
        assert ratios['flops'] > 1 and ratios['peak_memory'] > 0
        assert all(ratios[key] > 0 for key in ('step_time', 'step_time_fastest', 'cpu_time', 'cpu_time_fastest'))
        low, high = ratios['step_time_interval']
        assert min(ratios['step_time_runs']) <= low <= ratios['step_time'] <= high <= max(ratios['step_time_runs'])
    read = model['inference']['modules']
    assert read['matched'] == ['blocks.0.mlp.read', 'blocks.1.mlp.read']
    assert 0 < read['share'] < 0.1
    assert twin['inference']['modules']['share'] == 0
    assert results['ratios']['params'] == pytest.approx(model['params'] / twin['params'])


def test_vit_twin_flops_match_an_analytic_count_of_its_matmuls():
    batch, dim, depth, classes = 4, 32, 2, 10
    tokens, patch_dim = (16 // 4) ** 2, 4 * 4 * 3
    workload = Workload(ModelSpec('ait_small_patch4_32', {**TINY, 'gwl': False}), BenchSettings(batch_size=batch))
    per_block = (2 * tokens * dim * 3 * dim       # qkv
                 + 2 * 2 * tokens * tokens * dim  # attention scores and weighted sum, all heads
                 + 2 * tokens * dim * dim         # proj
                 + 2 * 2 * tokens * dim * 4 * dim)  # fc1, fc2
    analytic = 2 * tokens * patch_dim * dim + depth * per_block + 2 * tokens * dim * classes
    counted = benchmark.count_flops(workload, 'inference')['flops_per_image']
    assert counted == pytest.approx(analytic, rel=0.02)


def test_models_alternate_in_each_repeat(monkeypatch):
    runs = []

    def record_run(workload, mode, settings):
        runs.append((workload.spec.kwargs.get('gwl', True), mode))
        return StepTime(wall=1.0, cpu=1.0)

    monkeypatch.setattr(benchmark, 'measure_peak_memory', lambda spec, settings, mode: 2 ** 20)
    monkeypatch.setattr(benchmark, 'time_step', record_run)
    specs = [ModelSpec('ait_small_patch4_32', TINY), ModelSpec('ait_small_patch4_32', {**TINY, 'gwl': False})]
    results = benchmark.benchmark(specs, BenchSettings(batch_size=2), repeats=3)
    assert runs == [(True, 'inference'), (False, 'inference'), (True, 'train'), (False, 'train'),
                    (False, 'inference'), (True, 'inference'), (False, 'train'), (True, 'train'),
                    (True, 'inference'), (False, 'inference'), (True, 'train'), (False, 'train')]
    assert results['ratios']['train']['step_time'] == 1.0
    assert results['ratios']['train']['peak_memory'] == 1.0


def test_compare_takes_a_model_name_or_changes_to_the_first_model():
    model = ModelSpec('ait_small_patch4_32', {'img_size': 16})
    assert benchmark.compare_spec(['gwl=False', 'bottleneck=none'], model) == ModelSpec(
        'ait_small_patch4_32', {'img_size': 16, 'gwl': False, 'bottleneck': 'none'})
    assert benchmark.compare_spec(['vit_tiny_patch16_224', 'num_classes=10'], model) == ModelSpec(
        'vit_tiny_patch16_224', {'num_classes': 10})


def test_unknown_model_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['-m', 'ait_smal_patch4_32'])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "unknown model 'ait_smal_patch4_32'" in message and 'ait_small_patch4_32' in message


def test_speed_mode_tokens_change_the_base_settings():
    base = BenchSettings(batch_size=8, threads=1)
    assert benchmark.parse_speed_mode('fp32', base) == base
    assert benchmark.parse_speed_mode('bf16+cl+t2', base) == BenchSettings(
        batch_size=8, threads=2, amp_dtype='bfloat16', channels_last=True)
    assert benchmark.parse_speed_mode('compile', base).torchcompile == 'inductor'
    assert benchmark.parse_speed_mode('fp32', BenchSettings(amp_dtype='bfloat16')).amp_dtype is None
    with pytest.raises(ValueError, match=r"unknown token 'bfloat' in speed mode 'bfloat\+cl'"):
        benchmark.parse_speed_mode('bfloat+cl', base)
    with pytest.raises(ValueError, match=r"speed mode 'bf16\+fp32' sets amp_dtype twice"):
        benchmark.parse_speed_mode('bf16+fp32', base)
    with pytest.raises(ValueError, match='unknown token'):
        benchmark.parse_speed_mode('t0', base)


def test_speed_modes_alternate_and_give_per_repeat_ratios(monkeypatch):
    runs = []
    # made-up step times: the twin is 1 s in fp32 and 0.5 s in bf16, the AiT 1.1 times the twin
    seconds = {(True, None): 1.1, (False, None): 1.0, (True, 'bfloat16'): 0.55, (False, 'bfloat16'): 0.5}

    def record_run(workload, mode, settings):
        gwl = workload.spec.kwargs.get('gwl', True)
        runs.append((settings.amp_dtype, gwl, torch.get_num_threads()))
        return StepTime(wall=seconds[gwl, settings.amp_dtype], cpu=1.0, faults=3.0)

    monkeypatch.setattr(benchmark, 'time_step', record_run)
    specs = [ModelSpec('ait_small_patch4_32', TINY), ModelSpec('ait_small_patch4_32', {**TINY, 'gwl': False})]
    base = BenchSettings(batch_size=2, num_warm_iter=0)
    modes = {'fp32': base, 'bf16+t1': benchmark.parse_speed_mode('bf16+t1', base)}
    threads = torch.get_num_threads()
    results = benchmark.benchmark_speed_modes(specs, modes, repeats=2)
    assert torch.get_num_threads() == threads  # restored
    assert runs == [(None, True, threads), (None, False, threads), ('bfloat16', True, 1), ('bfloat16', False, 1),
                    ('bfloat16', False, 1), ('bfloat16', True, 1), (None, False, threads), (None, True, threads)]
    fp32, bf16 = results['speed_modes']['fp32'], results['speed_modes']['bf16+t1']
    assert fp32['ratios']['train']['wall']['median'] == pytest.approx(1.1)
    assert bf16['ratios']['train']['wall']['median'] == pytest.approx(1.1)
    assert [s['median'] for s in bf16['speedup']['train']] == pytest.approx([2.0, 2.0])
    assert bf16['models'][1]['train']['images_per_s'] == pytest.approx(2 / 0.5)
    assert bf16['models'][0]['train']['page_faults_per_step'] == 3.0


def test_speed_modes_end_to_end(tmp_path, capsys):
    results_file = tmp_path / 'modes.json'
    benchmark.main(['-m', 'ait_small_patch4_32', '--model-kwargs', *TINY_ARGS, '--compare', 'gwl=False',
                    '-b', '4', '--num-warm-iter', '1', '--num-bench-iter', '1', '--repeats', '2',
                    '--threads', '1', '--speed-modes', 'fp32', 'bf16', 'cl+t1', '--keep-freed-memory',
                    '--results-file', str(results_file)])
    table = capsys.readouterr().out
    assert 'model/compare (95% interval)' in table and 'model speed-up vs fp32' in table
    for name in ('fp32', 'bf16', 'cl+t1'):
        assert any(line.split()[:1] == [name] for line in table.splitlines()), name
    results = json.loads(results_file.read_text())
    assert list(results['speed_modes']) == ['fp32', 'bf16', 'cl+t1']
    assert results['speed_modes']['bf16']['settings']['amp_dtype'] == 'bfloat16'
    assert results['speed_modes']['cl+t1']['settings']['channels_last'] is True
    assert results['speed_modes']['fp32']['speedup']['train'][0]['median'] == 1.0
    assert results['environment']['keep_freed_memory'] is True
    for mode in results['speed_modes'].values():
        for model in mode['models']:
            assert model['train']['images_per_s'] > 0 and 'inference' not in model


def test_compiled_workload_is_one_graph_and_trains():
    # --torchcompile compiles with fullgraph=True: the training step (memory write, balance loss) is one graph
    torch = pytest.importorskip('torch')
    workload = Workload(ModelSpec('ait_small_patch4_32', {**TINY, 'depth': 1}), BenchSettings(batch_size=4))
    workload.compile('aot_eager')
    memory = workload.model.blocks[0].mlp.memory.memory.clone()
    workload.run('train', 2)
    assert not torch.equal(workload.model.blocks[0].mlp.memory.memory, memory)
    assert workload.model.balance_loss() is not None
    workload.run('inference', 1)
    assert workload.model.balance_loss() is None
    # fullgraph: a graph break is an error rather than a silently split program
    torch._dynamo.reset()
    workload.model.forward_head = lambda x: torch._dynamo.graph_break() or x.mean(1)
    with pytest.raises(Exception, match='graph_break|graph break'):
        workload.run('inference', 1)
    torch._dynamo.reset()


@pytest.mark.parametrize('flags,message', [
    (['--flops-modules', '('], "--flops-modules '(': expected a regular expression of module names"),
    (['--img-size', '0'], '--img-size must be >= 1, got 0'),
    (['--device', 'mps'], "--device 'mps': expected 'cpu', 'cuda' or 'cuda:N'"),
    (['--results-file', '/no/such/folder/results.json'], "expected a file in an existing folder"),
])
def test_bad_arguments_are_one_line_before_any_model_is_built(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(benchmark, 'benchmark', lambda *args: pytest.fail('benchmarked despite a bad argument'))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['-m', 'ait_small_patch4_32', '--model-kwargs', *TINY_ARGS, *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ': error: ' in error and message in error, error


def tiny_epoch_configs(tmp_path):
    """train.py configs of a tiny AiT and its twin, batches of 16 Triangle images."""
    import yaml
    base = dict(model='ait_tiny_patch32_64', dataset='triangle', num_classes=2, batch_size=16, warmup_epochs=0,
                workers=0, log_interval=100, model_kwargs=dict(embed_dim=32, num_heads=2))
    configs = []
    for name, extra in (('ait', {}), ('twin', {'gwl': False})):
        path = tmp_path / f'{name}.yaml'
        path.write_text(yaml.safe_dump({**base, 'model_kwargs': {**base['model_kwargs'], **extra}}))
        configs.append(str(path))
    return configs


def test_whole_epochs_of_two_configs_alternate_and_give_their_ratio(tmp_path, capsys):
    """--epochs: each config's epoch time is its run's own train_time_s, the ratio their median ratio."""
    configs = tiny_epoch_configs(tmp_path)
    results = benchmark.main(['--epochs', *configs, '--epoch-samples', '32', '--repeats', '2',
                              '--data-dir', str(tmp_path / 'data')])
    (pair,) = results['pairs']
    assert len(pair['model_seconds']) == len(pair['compare_seconds']) == 2
    ratios = sorted(a / b for a, b in zip(pair['model_seconds'], pair['compare_seconds']))
    assert pair['ratio'] == pytest.approx(sum(ratios) / 2)  # the median of two
    assert 'ait.yaml' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark.main(['--epochs', configs[0]])  # not a pair


def test_profile_shows_where_each_models_step_goes(tmp_path, capsys):
    """--profile: the GWL's parts appear in the AiT's breakdown only, forward and backward, per step."""
    results_file = tmp_path / 'results.json'
    benchmark.main(['-m', 'ait_small_patch4_32', '--model-kwargs', *TINY_ARGS, '--compare', 'gwl=False',
                    '-b', '4', '--num-warm-iter', '1', '--num-bench-iter', '2', '--repeats', '1', '--bench', 'train',
                    '--profile', '--results-file', str(results_file)])
    out = capsys.readouterr().out
    assert '| blocks.*.mlp.write_attn |' in out and '| module | ' in out and '| operator | ' in out
    ait, twin = json.loads(results_file.read_text())['profile']['train']
    assert ait['steps'] == twin['steps'] == 2
    write = ait['modules']['blocks.*.mlp.write_attn']
    assert write['forward_ms'] > 0 and write['backward_ms'] > 0 and 'aten::topk (forward)' in write['ops']
    assert not any('write_attn' in name or 'read' in name for name in twin['modules'])
    assert 'blocks.*.mlp.fc1' in ait['modules'] and 'blocks.*.mlp.fc1' in twin['modules']


def test_epochs_with_profile_profile_one_more_epoch_of_each_config(tmp_path, capsys):
    configs = tiny_epoch_configs(tmp_path)
    results = benchmark.main(['--epochs', *configs, '--epoch-samples', '32', '--repeats', '1', '--profile',
                              '--data-dir', str(tmp_path / 'data')])
    ait, twin = results['pairs'][0]['profile']
    assert ait['steps'] == twin['steps'] == 2  # 32 images in batches of 16
    assert 'blocks.*.mlp.write_attn' in ait['modules'] and 'blocks.*.mlp.write_attn' not in twin['modules']
    # the epoch's loading and optimizer steps are in the profile, outside the model
    assert any('Optimizer.step' in op for op in ait['modules']['(outside)']['ops'])
    assert 'one epoch of 2 steps each under the profiler' in capsys.readouterr().out


def test_a_question_answering_model_is_timed_with_its_questions():
    workload = Workload(ModelSpec('ait_small_w256_patch15_75', dict(embed_dim=32, num_heads=2, num_slots=6, slot_dim=8,
                                                                    gwl_heads=2)), BenchSettings(batch_size=2))
    assert [tuple(t.shape) for t in workload.inputs] == [(2, 3, 75, 75), (2, workload.model.question_dim)]
    for mode in ('inference', 'train'):
        workload.run(mode, 1)
