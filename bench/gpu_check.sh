#!/usr/bin/env bash
# The GPU half of the speed issue in one call (stage budgets 80 + 260 + 200 s: under the 10-minute limit of one device call), from the repo root:
#
#     bash bench/gpu_check.sh                 # on the GPU machine; results under $OUT (default /tmp/gpu_check)
#     SMOKE=1 bash bench/gpu_check.sh         # the same stages at tiny sizes on CPU (a dry run, ~3 min)
#
# The GPU image has torch 2.11, transformers 5.17 and no DeepSpeed, and no internet: DeepSpeed and the packages
# it needs that the image lacks travel as wheels in .whl/ (git-ignored; carry it with the call). Make them with
#     DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_17_x86_64 -d .whl hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 \
#         annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.15.0
#
# Stages (each under its own timeout, each writing to $OUT as it goes):
#   1. env.txt       GPU, driver, versions
#   2. checks.txt    host-device syncs in one training step of ours (torch.cuda sync debug mode), torch.compile
#                    graph breaks of a dense and an MoE block, SDPA with values padded to the key width vs not,
#                    compiled + checkpointed blocks against the eager model (loss, gradients, token counts)
#   3. train.txt/json  bench/train.py at smollm2-deepseek-135m, micro-batch 8 x 2048, bf16: ours eager,
#                    compiled, with activation checkpointing and with the unfused loss, transformers DeepseekV3
#                    (eager attention + eager experts as in the issue's 29,449 tok/s, and sdpa + grouped_mm),
#                    transformers Llama at smollm2-135m, the DeepSpeed engine and trainer step (ZeRO-0)
#   4. decode.txt    bench/decode.py B=1 and B=32, 512 prompt + 128 new tokens, bf16: ours eager, ours
#                    compiled (static-shape step, mode "reduce-overhead" = CUDA graphs; its compile time is
#                    printed apart) and transformers' generate
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
PY=python3
T0=$(date +%s)
stage() { echo "== $(date +%T) (+$(( $(date +%s) - T0 ))s) $*" | tee -a "$OUT/summary.txt"; }

if [ "$SMOKE" = 1 ]; then
  DEV=cpu; PRESET=tiny; TRAIN_ARGS=(--batch 4 --seq 64 --steps 1 --repeats 1 --warmup 1 --threads 1)
  DECODE_ARGS=(--preset tiny --prompt-len 16 --new-tokens 4 --batch-sizes 1,4 --repeats 1 --threads 1)
  CHECK_PRESET=tiny
else
  DEV=cuda; PRESET=smollm2-deepseek-135m; TRAIN_ARGS=(--batch 8 --seq 2048 --steps 3 --repeats 3 --warmup 2)
  DECODE_ARGS=(--preset smollm2-deepseek-135m --device cuda --dtype bfloat16 --prompt-len 512 --new-tokens 128
               --batch-sizes 1,32 --repeats 1)
  CHECK_PRESET=smollm2-deepseek-135m
fi

# ------------------------------------------------------------------------------------------ 1. environment
stage "install + environment"
if ! $PY -c "import deepspeed" >/dev/null 2>&1; then
  wheels=()
  for n in deepspeed hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions; do
    wheels+=(.whl/"$n"-[0-9]*.whl)
  done
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}" \
    2>&1 | tail -3 | tee -a "$OUT/summary.txt"
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  date -u; uptime; nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  $PY - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("transformers", "deepspeed", "pydantic", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "unavailable:", type(e).__name__, e)
EOF
} > "$OUT/env.txt" 2>&1
grep -E "^(python|transformers|deepspeed)" "$OUT/env.txt" | tee -a "$OUT/summary.txt"

# ------------------------------------------------------------------------------------------------ 2. checks
stage "checks: syncs, graph breaks, SDPA padding"
DEV=$DEV CHECK_PRESET=$CHECK_PRESET timeout 80 $PY - > "$OUT/checks.txt" 2>&1 <<'EOF'
import collections, os, time, warnings
import torch, torch.nn.functional as F
from smolds import ModelConfig, Transformer

dev = torch.device(os.environ["DEV"])
cuda = dev.type == "cuda"
cfg = ModelConfig.from_preset(os.environ["CHECK_PRESET"]).replace(num_hidden_layers=3)  # dense, MoE, MoE
B, T = (8, 2048) if cuda else (2, 64)
torch.manual_seed(0)
ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev)

# (a) host-device syncs in one training step (forward + backward), bf16 weights as the DeepSpeed engine runs
if cuda:
    for label, dtype, autocast in (("bf16 weights", torch.bfloat16, False), ("autocast over fp32", torch.float32, True)):
        model = Transformer(cfg).to(dev, dtype).train()
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()  # warm up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
            torch.cuda.set_sync_debug_mode(0)
        where = collections.Counter()
        for w in caught:
            if "synchroniz" in str(w.message):
                where[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
        print(f"syncs in one fwd+bwd of 3 layers ({label}): {sum(where.values())}", dict(where))
        del model

# (b) torch.compile graph breaks of a dense and an MoE block
for capture in (False, True):
    torch._dynamo.reset()
    torch._dynamo.config.capture_dynamic_output_shape_ops = capture
    model = Transformer(cfg).to(dev, torch.bfloat16 if cuda else torch.float32).train()
    x = ids[:2, :256]
    ctx = model._context(x, None, None)
    h = model.embed_tokens(x)
    for i in (0, 1):
        try:
            ex = torch._dynamo.explain(model.layers[i])(h, ctx)
            reasons = collections.Counter(str(b.reason).splitlines()[0][:120] for b in ex.break_reasons)
            print(f"explain block {i} ({model.layers[i].ffn_kind}), capture_dynamic_output_shape_ops={capture}: "
                  f"graphs {ex.graph_count}, breaks {ex.graph_break_count} {dict(reasons)}")
        except Exception as e:  # noqa: BLE001
            print(f"explain block {i} failed: {type(e).__name__}: {str(e)[:300]}")
    del model

# (c) SDPA forward + backward, values padded to the key width (what MLA.expanded does) vs not
H, DQK, DV = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
dtype = torch.bfloat16 if cuda else torch.float32
q, k = (torch.randn(B, H, T, DQK, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
v = torch.randn(B, H, T, DV, device=dev, dtype=dtype, requires_grad=True)
def plain():
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
def padded():
    return F.scaled_dot_product_attention(q, k, F.pad(v, (0, DQK - DV)), is_causal=True)[..., :DV]
for name, f in (("unpadded", plain), ("padded", padded)) * 2:
    times = []
    for _ in range(6):
        if cuda: torch.cuda.synchronize()
        t = time.perf_counter(); f().sum().backward()
        if cuda: torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(f"SDPA fwd+bwd B{B} H{H} T{T} dqk {DQK} dv {DV} {name}: {sorted(times)[len(times) // 2] * 1e3:.2f} ms")

# (d) compiled blocks with activation checkpointing (last: the stage's timeout may cut it) against the plain
# eager model: loss, gradients and router counts after one forward + backward
from smolds.model.router import routers
x = ids[:2, :257]
runs = []
for compiled in (False, True):
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev, dtype).train().set_activation_checkpointing(compiled).compile_blocks(compiled)
    t = time.perf_counter()
    try:
        loss = model(x[:, :-1], targets=x[:, 1:]).loss
        loss.backward()
    except Exception as e:  # noqa: BLE001
        print(f"compiled+ckpt failed: {type(e).__name__}: {str(e)[:300]}")
        break
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    counts = torch.stack([r.tokens_per_expert for r in routers(model)])
    runs.append((loss.item(), grads, counts, time.perf_counter() - t))
if len(runs) == 2:
    (l0, g0, c0, _), (l1, g1, c1, t1) = runs
    print(f"compiled+ckpt vs eager: loss {l1:.5f} vs {l0:.5f}, grad rel diff {((g1 - g0).norm() / g0.norm()).item():.2e}, "
          f"counts equal {bool((c1 == c0).all())} ({c1.sum().item():.0f} vs {c0.sum().item():.0f}), first call {t1:.1f} s")
EOF
echo "exit $?" >> "$OUT/checks.txt"
grep -E "^(syncs|explain|SDPA|compiled\+ckpt|exit)" "$OUT/checks.txt" | tee -a "$OUT/summary.txt"

# ---------------------------------------------------------------------------------------------- 3. training
stage "train bench ($PRESET on $DEV)"
timeout 260 $PY bench/train.py --preset "$PRESET" --device "$DEV" "${TRAIN_ARGS[@]}" --compile --checkpointing \
  --unfused-ce --hf-dsv3 eager:eager,sdpa:grouped_mm --llama-attn sdpa --json "$OUT/train.json" > "$OUT/train.txt" 2>&1
echo "exit $?" >> "$OUT/train.txt"
grep -E "^(#|[0-9]{4}-|model:|\||row |round |built |exit)" "$OUT/train.txt" | tee -a "$OUT/summary.txt"

# ------------------------------------------------------------------------------------------------ 4. decode
stage "decode bench"
timeout 200 $PY bench/decode.py "${DECODE_ARGS[@]}" > "$OUT/decode.txt" 2>&1
echo "exit $?" >> "$OUT/decode.txt"
grep -E "params\)|^ *(B|[0-9]+) |^cache bytes|skipping cudagraphs|recompil|^exit" "$OUT/decode.txt" | tee -a "$OUT/summary.txt"
stage "done"
