"""Needle in a haystack as passkey retrieval (Mohtashami & Jaggi, 2023), scored teacher-forced
or by generating the answer.

A context of exactly `length` tokens: BOS, filler with the needle ("The pass key is NNNNN.
Remember it. NNNNN is the pass key.") at a chosen depth, then "What is the pass key? The pass
key is " and the answer. (The usual instruction sentence is left out: byte-level models need the
short prompt, about 100 tokens, to test contexts of a few hundred.) The whole sequence is fed
at once; the answer counts as retrieved when the greedy prediction of every answer token is
right (exact match), and its NLL is kept too (a smooth signal for small models). With
eval.niah_mode=generate the prompt stops after the question and the answer is generated
greedily with the decoding cache (lmtrain.generate); exact match then reads the generated
tokens. (For greedy decoding the two agree up to ties and the rounding of the decode path, so
a difference between them points at the cache.) Filler is
either synthetic (a fixed repeated text) or natural (held-out text of many documents, at a
seeded offset).

Any tokenizer: every part is encoded by the run's tokenizer, and the question and its answer
are encoded together, as the model would read them; the answer span is the tokens after the
longest common prefix of encode(question) and encode(question + answer), so a subword merge
across the boundary (" 48213" as one token with its space) is part of the scored span.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from lmtrain.evals.scoring import batched

SYNTHETIC_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There "
                    "and back again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is "


@dataclasses.dataclass
class PasskeySample:
  tokens: np.ndarray  # [length + 1]: inputs are tokens[:-1], targets tokens[1:]
  answer_slice: slice  # target positions of the answer
  needle_start: int  # index in tokens where the needle begins
  filler_tokens: int  # total filler tokens around the needle


def make_sample(tokenizer, *, length: int, depth: float, key: int, filler_ids: np.ndarray,
                filler_offset: int = 0) -> PasskeySample:
  """One context of exactly `length` input tokens with the needle at `depth` in [0, 1] of the
  filler (0: right after BOS, 1: right before the question)."""
  enc = lambda text: tokenizer.encode(text)
  head = np.asarray([tokenizer.bos_id])
  needle = enc(NEEDLE.format(key=key))
  tail, answer = question_and_answer(tokenizer, str(key))
  fixed = len(head) + len(needle) + len(tail) + len(answer)
  n_filler = length + 1 - fixed
  if n_filler < 0:
    raise ValueError(f"needle: length={length} is shorter than the prompt itself ({fixed - 1})")
  filler = np.resize(np.roll(filler_ids, -filler_offset), n_filler)
  before = int(round(depth * n_filler))
  tokens = np.concatenate([head, filler[:before], needle, filler[before:], tail, answer])
  tokens = tokens.astype(np.int32)
  return PasskeySample(tokens, slice(length - len(answer), length), len(head) + before, n_filler)


def question_and_answer(tokenizer, answer: str) -> tuple[np.ndarray, np.ndarray]:
  """(question tokens, answer tokens): QUESTION + answer encoded together, split where the
  encoding stops being that of the question alone."""
  question = np.asarray(tokenizer.encode(QUESTION))
  full = np.asarray(tokenizer.encode(QUESTION + answer))
  common = 0
  for a, b in zip(question, full):
    if a != b:
      break
    common += 1
  common = min(common, len(full) - 1)  # the answer has at least one token
  return full[:common], full[common:]


def prompt_tokens(tokenizer) -> int:
  """Tokens of a context that are not filler: the shortest possible `length`."""
  sample = make_sample(tokenizer, length=10 ** 4, depth=0.0, key=10000, filler_ids=np.zeros(1))
  return 10 ** 4 - sample.filler_tokens


def filler_ids(kind: str, tokenizer, natural_text) -> np.ndarray:
  """natural_text: held-out text (bytes) or its token ids (an int array)."""
  if kind == "synthetic":
    return tokenizer.encode(SYNTHETIC_FILLER)
  if kind == "natural":
    if natural_text is None or not len(natural_text):
      raise ValueError("needle: natural filler needs held-out text")
    if isinstance(natural_text, np.ndarray):
      return natural_text.astype(np.int32)
    return tokenizer.encode(natural_text)
  raise ValueError(f"needle: filler={kind!r} is not one of synthetic, natural")


def passkey_grid(scorer, params, tokenizer, *, lengths, depths, samples: int, filler: str,
                 natural_text, seed: int, batch_tokens: int, generate_fn=None) -> dict:
  """Accuracy and answer NLL for every (depth, length) cell, `samples` seeded contexts each.

  generate_fn(prompts, max_new_tokens) -> new tokens per prompt (greedy): when given, the
  accuracy is that of the generated answer (the prompt stops before the answer; the cache and
  the decode step produce it), and the teacher-forced one is kept as accuracy_teacher_forced.
  """
  ids = filler_ids(filler, tokenizer, natural_text)
  acc = np.zeros((len(depths), len(lengths)))
  nll = np.zeros((len(depths), len(lengths)))
  acc_tf = np.zeros((len(depths), len(lengths)))
  for li, length in enumerate(lengths):
    for di, depth in enumerate(depths):
      rng = np.random.default_rng([seed, li, di])
      cell = [make_sample(tokenizer, length=length, depth=depth,
                          key=int(rng.integers(10000, 100000)), filler_ids=ids,
                          filler_offset=int(rng.integers(len(ids))))
              for _ in range(samples)]
      hits, nlls, generated = [], [], []
      for chunk in batched(cell, max(1, batch_tokens // length)):
        toks = np.stack([c.tokens for c in chunk])
        tok_nll, correct = scorer.score(params, toks[:, :-1], toks[:, 1:],
                                        np.ones_like(toks[:, :-1]))
        for row, c in enumerate(chunk):
          hits.append(bool(np.all(correct[row, c.answer_slice])))
          nlls.append(float(np.sum(tok_nll[row, c.answer_slice])))
        if generate_fn is not None:
          generated += generated_hits(generate_fn, chunk)
      acc_tf[di, li] = np.mean(hits)
      acc[di, li] = np.mean(generated) if generate_fn is not None else np.mean(hits)
      nll[di, li] = np.mean(nlls)
  out = {"filler": filler, "lengths": list(lengths), "depths": list(depths),
         "samples": samples, "mode": "teacher_forced" if generate_fn is None else "generate",
         "accuracy": acc.tolist(), "answer_nll": nll.tolist()}
  if generate_fn is not None:
    out["accuracy_teacher_forced"] = acc_tf.tolist()
  return out


def generated_hits(generate_fn, chunk: list[PasskeySample]) -> list[bool]:
  """Whether greedy generation after each sample's question writes exactly its answer."""
  answers = [c.tokens[c.answer_slice.start + 1:c.answer_slice.stop + 1] for c in chunk]
  prompts = [c.tokens[:c.answer_slice.start + 1] for c in chunk]
  new = generate_fn(prompts, max(len(a) for a in answers))
  return [len(g) >= len(a) and bool(np.all(np.asarray(g[:len(a)]) == a))
          for g, a in zip(new, answers)]


def effective_length(lengths, accuracy_by_length, threshold: float) -> int:
  """The longest length up to which accuracy stays >= threshold at every length (0 if none)."""
  best = 0
  for length, acc in sorted(zip(lengths, accuracy_by_length)):
    if acc < threshold:
      break
    best = length
  return best
