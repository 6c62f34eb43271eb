"""`python -m kvp_jax.eval --flagfile=RUN/eval.flags` (the quickstart writes that file; or name methods yourself)

  python -m kvp_jax.eval --base_checkpoint=runs/q/base --output_dir=runs/q/eval --method=base \\
      --method=lp_alone:lp0.50@runs/q/lp_alone_lp0.50 --method=kvp:lp0.50@runs/q/kvp_lp0.50

Each --method is METHOD[:AUX][@PATH][;KEY=VALUE]... (see kvp_jax/evaluation/registry.py). Writes report.json, report.md,
pareto.png and kv_error.png to --output_dir and prints the table.
"""

from __future__ import annotations

import sys

from absl import app, flags

F = flags.FLAGS
flags.DEFINE_string("base_checkpoint", None, "The base model: a pretrain workdir or Hugging Face directory.")
flags.DEFINE_multi_string("method", ["base"], "A method to evaluate, METHOD[:AUX][@PATH][;KEY=VALUE]...; repeat.")
flags.DEFINE_string("output_dir", "eval", "Where report.json, report.md and the plots go.")
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: the base checkpoint's).")
flags.DEFINE_integer("num_qa", 32, "Examples per QA task (one-hop and two-hop each).")
flags.DEFINE_list("qa_num_facts", ["8", "24"], "Min,max facts per QA prompt (~15 tokens each).")
flags.DEFINE_enum("qa_distractors", "shared", ["shared", "distinct"], "QA level (as the models were trained).")
flags.DEFINE_enum("qa_answer_style", "bare", ["bare", "sentence"], "QA answer style (as the models were trained).")
flags.DEFINE_integer("num_code", 32, "Next-line examples from held-out stdlib files.")
flags.DEFINE_list("code_context_chars", ["256", "1024"], "Min,max characters of code context.")
flags.DEFINE_integer("qa_max_new_tokens", 6, "Greedy tokens allowed for a QA answer.")
flags.DEFINE_integer("code_max_new_tokens", 24, "Greedy tokens allowed for a code line (and teacher-forced window).")
flags.DEFINE_integer("batch_size", 16, "Prompts per batch.")
flags.DEFINE_list("buckets", None, "Prompt lengths to pad to (default: powers of two from 64).")
flags.DEFINE_integer("kv_error_examples", 8, "QA prompts over which the per-layer KV error is averaged.")
flags.DEFINE_integer("seed", 1234, "Seed of the evaluation examples.")
flags.DEFINE_list("qa_levels", [], "Chat QA levels (easy, long, shared, 2hop) prompted through the tokenizer's chat "
                  "template, instead of the plain qa / qa_2hop tasks (for an instruction-tuned base).")
flags.DEFINE_bool("fidelity", False, "Also score first_token_agree / first_token_kl against the base (needs "
                  "--method=base).")
flags.DEFINE_bool("code_line_em", True, "Score greedy next-line exact match on code (token accuracy always).")
flags.DEFINE_bool("add_bos", True, "Start prompts with BOS, as the training documents did.")
flags.mark_flag_as_required("base_checkpoint")


def _pair(v) -> tuple[int, int]:
  lo, hi = (int(x) for x in v)
  return lo, hi


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  from kvp_jax.evaluation import registry
  from kvp_jax.evaluation import report as eval_report
  from kvp_jax.evaluation import runner as eval_runner
  from kvp_jax.evaluation import tasks
  from kvp_jax.models.hf_checkpoint import CheckpointError
  try:
    ec = tasks.EvalConfig(
        num_qa=F.num_qa, qa_num_facts=_pair(F.qa_num_facts), qa_distractors=F.qa_distractors,
        qa_answer_style=F.qa_answer_style, num_code=F.num_code,
        code_context_chars=_pair(F.code_context_chars), qa_max_new_tokens=F.qa_max_new_tokens,
        code_max_new_tokens=F.code_max_new_tokens, batch_size=F.batch_size,
        buckets=tuple(int(b) for b in F.buckets) if F.buckets else None, kv_error_examples=F.kv_error_examples,
        seed=F.seed, qa_levels=tuple(F.qa_levels), fidelity=F.fidelity, code_line_em=F.code_line_em,
        add_bos=F.add_bos)
    specs = [registry.MethodSpec.parse(m) for m in F.method]
    report = eval_runner.evaluate(F.base_checkpoint, specs, ec, F.output_dir, tokenizer=F.tokenizer)
  except (ValueError, CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)  # bad input: one line saying what was wrong, not a traceback
    sys.exit(2)
  print(eval_report.markdown(report))
  print(f"wrote {F.output_dir}/report.json, report.md, pareto.png, kv_error.png")


if __name__ == "__main__":
  app.run(main)
