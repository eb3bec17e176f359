"""Constants that models and data share (so that models need not import the data package)."""

# CIFAR-10 per-channel statistics of the training set (the authors' code uses the often copied
# std (0.2023, 0.1994, 0.2010), which is not the dataset's)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# Sort-of-CLEVR: the answer classes in label order, and the size of a one-hot question vector
# (6 colours, 2 kinds of question, 3 subtypes); the generator in timm_ait.data builds its questions to it
SORT_OF_CLEVR_ANSWERS = ('yes', 'no', 'square', 'circle', '1', '2', '3', '4', '5', '6')
SORT_OF_CLEVR_QUESTION_DIM = 11
