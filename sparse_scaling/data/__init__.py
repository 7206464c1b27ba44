"""Data for sparse_scaling: the embedded Shakespeare corpus, its SentencePiece vocabulary and
trax LM inputs built from them (`sparse_scaling.data.embedded_lm_inputs` in gin)."""
from sparse_scaling.data.corpus import shakespeare_texts
from sparse_scaling.data.corpus import shakespeare_works
from sparse_scaling.data.corpus import SPLITS
from sparse_scaling.data.corpus import VALIDATION_WORKS
from sparse_scaling.data.corpus import Work
from sparse_scaling.data.lm import embedded_lm_inputs
from sparse_scaling.data.lm import embedded_vocab
from sparse_scaling.data.lm import VOCAB_SIZE
from sparse_scaling.data.vocab import EOS_ID
from sparse_scaling.data.vocab import load_or_train_vocab
from sparse_scaling.data.vocab import PAD_ID
from sparse_scaling.data.vocab import UNK_ID
