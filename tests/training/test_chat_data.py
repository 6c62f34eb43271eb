"""Chat-format training data for an instruction-tuned base: conversations rendered with the tokenizer's chat
template, no extra BOS, and the loss starting at the first assistant reply."""

import numpy as np
import pytest
from helpers import chat_tokenizer

from kvp_jax.training import stages


def test_chat_corpus_is_rendered_with_the_template_and_masks_the_context():
  tok = chat_tokenizer()
  dc = stages.DataConfig(num_qa_docs=6, qa_num_facts=(4, 8), max_code_files=2, qa_format="chat", add_bos=False,
                         qa_questions_per_doc=2, qa_distractors="mixed", qa_context_loss=False, seq_len=512,
                         batch_size=1)
  texts = stages.texts_for(dc, tok)
  chats = [t for t in texts if t.startswith("<|im_start|>system\n")]
  assert len(chats) == 6 and len(texts) == 8
  assert all(t.count("<|im_start|>assistant\n") == 2 for t in chats)
  batch = next(stages._data_iter(dc, chats[:1], tok))
  ids, w = batch["inputs"][0], batch["weights"][0]
  assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # the template's own <|im_start|>, not doubled
  first = int(np.argmax(w > 0))  # the first target in the loss: the first token of the first answer
  reply = chats[0].split("<|im_start|>assistant\n", 1)[1]
  assert reply.startswith(tok.decode(batch["targets"][0][first:first + 5]))
  assert "Question" in tok.decode(ids[:first])
  with pytest.raises(ValueError, match="chat template"):
    stages.texts_for(dc, None)
