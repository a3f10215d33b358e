"""Mixed context window training (LongRoPE2, arXiv 2502.20082, section 3.3): data for finetuning an extended model.

LongRoPE2 finetunes on short and long documents packed together in rows of one length, each document attending only
to itself with its own RoPE table: a document uses the rescaled long table iff its own length is > L0
(``original_length``), and the original short table otherwise. Short-context quality is kept by the short documents
while the long ones adapt the model to the long table. A patched model (:func:`lr2kernels.patch`) does the
per-document part: given packed rows (positions restarting at 0 at every document, or ``cu_seq_lens_q``) it runs one
table per document. This layer makes those rows:

- :func:`read_documents` / :func:`default_documents`: tokenized documents from files, or a smoke-test corpus;
- :func:`pack_documents`: documents -> :class:`PackedRow` rows of ``seq_len`` tokens, long and short rows mixed in
  a chosen fraction, labels masked so that no target crosses a document boundary;
- :func:`collate`: rows -> a batch of model keyword arguments.

Layer: the top library layer (below the apps only); ``ops``, ``hf`` and ``search`` never import it. Packing and data
need only torch, and ``import lr2kernels.train`` does not import transformers.
"""

from lr2kernels.train.data import default_documents, read_documents
from lr2kernels.train.packing import IGNORE_INDEX, PackedRow, collate, pack_documents

__all__ = ["IGNORE_INDEX", "PackedRow", "collate", "default_documents", "pack_documents", "read_documents"]
