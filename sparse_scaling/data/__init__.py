"""Data for sparse_scaling: the embedded Shakespeare corpus, its SentencePiece vocabulary and
trax inputs: LM and span corruption on the embedded corpus, TFDS C4 and arXiv, local text files,
Debian's IETF RFCs and token files (`sparse_scaling.data.<function>` in gin)."""
from sparse_scaling.data.arxiv import arxiv_summarization_inputs
from sparse_scaling.data.c4 import c4_lm_inputs
from sparse_scaling.data.c4 import c4_span_corruption_inputs
from sparse_scaling.data.corpus import decode_text
from sparse_scaling.data.corpus import read_text
from sparse_scaling.data.corpus import shakespeare_texts
from sparse_scaling.data.corpus import shakespeare_works
from sparse_scaling.data.corpus import SPLITS
from sparse_scaling.data.corpus import VALIDATION_WORKS
from sparse_scaling.data.corpus import Work
from sparse_scaling.data.lm import embedded_lm_inputs
from sparse_scaling.data.lm import embedded_vocab
from sparse_scaling.data.lm import VOCAB_SIZE
from sparse_scaling.data.local_text import local_text_lm_inputs
from sparse_scaling.data.local_text import local_text_summarization_inputs
from sparse_scaling.data.rfc import rfc_lm_inputs
from sparse_scaling.data.rfc import rfc_summarization_inputs
from sparse_scaling.data.span_corruption import embedded_span_corruption_inputs
from sparse_scaling.data.token_files import token_file_lm_inputs
from sparse_scaling.data.span_corruption import span_corrupt
from sparse_scaling.data.span_corruption import uncorrupt
from sparse_scaling.data.vocab import EOS_ID
from sparse_scaling.data.vocab import load_or_train_vocab
from sparse_scaling.data.vocab import PAD_ID
from sparse_scaling.data.vocab import UNK_ID
