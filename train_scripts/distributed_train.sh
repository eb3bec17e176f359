#!/usr/bin/env bash
# Train on NUM_PROC processes of this machine (one per GPU; gloo on the CPU):
#   ./train_scripts/distributed_train.sh 8 -c train_scripts/configs/ait_small_patch4_32-cifar10.yaml --data-dir /data
NUM_PROC=${1:?usage: distributed_train.sh NUM_PROC [train.py args...]}
shift
exec torchrun --standalone --nproc_per_node="$NUM_PROC" "$(dirname "$0")/train.py" "$@"
