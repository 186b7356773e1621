#!/usr/bin/env bash
# Where the recipes' TPU bytes go: compile a few cells with their HLO and attribute the bytes by
# op name (experiments/hlo_bytes.py). Writes results/tpu_plan/probes/*.txt; results/tpu_plan.md
# (Findings) quotes them. About 90 minutes on one core (half of it the four SwinV2-B compiles at the
# end); compiles already in WORKDIRS are reused.
#
#   bash scripts/tpu_probes.sh [WORKDIRS]     # default workdirs/tpu_probes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
W=${1:-workdirs/tpu_probes}
OUT=results/tpu_plan/probes
mkdir -p "$W" "$OUT"

compile() {  # name config-with-args topology [config overrides]
  local dir="$W/$1" name=$1 config=$2 topo=$3
  shift 3
  if [[ ! -f "$dir/train_${topo/:/_}.hlo.txt.gz" ]]; then
    "$PY" -m experiments.main --mode=compile --config="$config" --topology="$topo" --compile_programs=train \
      "$@" --workdir="$dir" > "$dir.log" 2>&1 || { echo "FAILED: $name, see $dir.log" >&2; exit 1; }
  fi
}

report() {  # out-name a b [hlo_bytes flags]
  local out=$1 a=$2 b=$3; shift 3
  { echo "\$ python -m experiments.hlo_bytes $a $b $*"; "$PY" -m experiments.hlo_bytes "$a" "$b" "$@"; } > "$OUT/$out.txt"
  echo "$OUT/$out.txt: $(sed -n 4p "$OUT/$out.txt")"
}

# T5.1.1-Base widths with 2 encoder and 2 decoder layers, the paper's batch: the same per-device
# program as the 12 + 12 layer model, 2 minutes to compile instead of 4-9 and 4 GB instead of 13.
for topo in v4:2x2x4 v5e:4x8; do
  for r in dense ste mdgf srste sdgf; do
    compile "t5_depth2_${r}_${topo/:/_}" "configs/t5_c4.py:recipe=$r,nm=1:16,layers=all,depth=2" "$topo"
  done
  for r in ste mdgf srste sdgf; do
    report "t5_depth2_${r}_vs_dense_${topo/:/_}" "$W/t5_depth2_dense_${topo/:/_}/train_${topo/:/_}.hlo.txt.gz" \
      "$W/t5_depth2_${r}_${topo/:/_}/train_${topo/:/_}.hlo.txt.gz" --top 15
  done
done
report t5_depth2_ste_vs_mdgf_v4_2x2x4 "$W/t5_depth2_mdgf_v4_2x2x4/train_v4_2x2x4.hlo.txt.gz" \
  "$W/t5_depth2_ste_v4_2x2x4/train_v4_2x2x4.hlo.txt.gz" --top 15

# T5.1.1-Base at full depth (12 + 12 layers) on v4-32, STE and SR-STE against dense: the grid cells'
# misses by op (each compile 4-5 minutes and up to 17 GB of host memory).
compile t5_dense_v4_2x2x4 configs/t5_c4.py:recipe=dense v4:2x2x4
for r in ste srste; do
  compile "t5_${r}_v4_2x2x4" "configs/t5_c4.py:recipe=$r,nm=1:16,layers=all" v4:2x2x4
  report "t5_${r}_vs_dense_v4_2x2x4" "$W/t5_dense_v4_2x2x4/train_v4_2x2x4.hlo.txt.gz" \
    "$W/t5_${r}_v4_2x2x4/train_v4_2x2x4.hlo.txt.gz" --top 15
done

# ViT-B/16 at batch 4096 on v4-32: STEP, MDGF, STE and SR-STE on MLP + Q, K, V, SDGF on the MLPs and on MLP + Q, K, V.
compile vit_dense configs/vit_imagenet.py:recipe=dense v4:2x2x4
for r in step,layers=mlp_qkv mdgf,layers=mlp_qkv sdgf,layers=mlp sdgf,layers=mlp_qkv ste,layers=mlp_qkv \
         srste,layers=mlp_qkv; do
  name=vit_${r/,layers=/_}
  compile "$name" "configs/vit_imagenet.py:recipe=$r,nm=1:16" v4:2x2x4
  report "${name}_vs_dense_v4_2x2x4" "$W/vit_dense/train_v4_2x2x4.hlo.txt.gz" "$W/$name/train_v4_2x2x4.hlo.txt.gz" --top 15
done

# ViT-B/16 MDGF at 2:4 on the MLPs: the 2:4 mask's TPU layout cost.
compile vit_mdgf_2x4_mlp configs/vit_imagenet.py:recipe=mdgf,nm=2:4,layers=mlp v4:2x2x4
report vit_mdgf_2x4_mlp_vs_dense_v4_2x2x4 "$W/vit_dense/train_v4_2x2x4.hlo.txt.gz" \
  "$W/vit_mdgf_2x4_mlp/train_v4_2x2x4.hlo.txt.gz" --top 15

# T5 STEP against a dense step with STEP's optimizer: STEP is an Adam method, so its config
# swaps T5X's Adafactor (factored second moments) for AdamW; the dense Adafactor step is not its baseline.
ADAMW=(--config.optimizer.name=adamw --config.optimizer.schedule=cosine --config.optimizer.lr=1e-3
       --config.optimizer.clip=1.0)
for topo in v4:2x2x4 v5e:4x8; do
  compile "t5_depth2_dense_adamw_${topo/:/_}" configs/t5_c4.py:recipe=dense,depth=2 "$topo" "${ADAMW[@]}"
  compile "t5_depth2_step_${topo/:/_}" configs/t5_c4.py:recipe=step,nm=1:16,layers=all,depth=2 "$topo"
  report "t5_depth2_dense_adamw_vs_dense_${topo/:/_}" "$W/t5_depth2_dense_${topo/:/_}/train_${topo/:/_}.hlo.txt.gz" \
    "$W/t5_depth2_dense_adamw_${topo/:/_}/train_${topo/:/_}.hlo.txt.gz" --top 15
  report "t5_depth2_step_vs_dense_adamw_${topo/:/_}" "$W/t5_depth2_dense_adamw_${topo/:/_}/train_${topo/:/_}.hlo.txt.gz" \
    "$W/t5_depth2_step_${topo/:/_}/train_${topo/:/_}.hlo.txt.gz" --top 15
done

# T5 SDGF on 8 H100s: each stage of the switch apart (XLA's GPU figure is the costliest, 1.076).
compile t5_depth2_dense_h100_8 configs/t5_c4.py:recipe=dense,depth=2 h100:8
compile t5_depth2_sdgf_h100_8 configs/t5_c4.py:recipe=sdgf,nm=1:16,layers=all,depth=2 h100:8
report t5_depth2_sdgf_vs_dense_h100_8 "$W/t5_depth2_dense_h100_8/train_h100_8.hlo.txt.gz" \
  "$W/t5_depth2_sdgf_h100_8/train_h100_8.hlo.txt.gz" --top 15

# SR-STE's term against STE, and STEP per branch of AutoSwitch's statistic, on MLP + Q, K, V: ViT-B/16
# (compiled above) and SwinV2-B (a SwinV2-B compile needs 13 GB of host memory and 6-10 minutes).
report vit_srste_mlp_qkv_vs_ste_v4_2x2x4 "$W/vit_ste_mlp_qkv/train_v4_2x2x4.hlo.txt.gz" \
  "$W/vit_srste_mlp_qkv/train_v4_2x2x4.hlo.txt.gz" --top 15
compile swin_dense configs/swinv2_imagenet.py:recipe=dense v4:2x2x4
for r in ste srste step; do
  compile "swin_${r}_mlp_qkv" "configs/swinv2_imagenet.py:recipe=$r,nm=1:16,layers=mlp_qkv" v4:2x2x4
done
report swin_srste_mlp_qkv_vs_ste_v4_2x2x4 "$W/swin_ste_mlp_qkv/train_v4_2x2x4.hlo.txt.gz" \
  "$W/swin_srste_mlp_qkv/train_v4_2x2x4.hlo.txt.gz" --top 15
report swin_step_mlp_qkv_vs_dense_v4_2x2x4 "$W/swin_dense/train_v4_2x2x4.hlo.txt.gz" \
  "$W/swin_step_mlp_qkv/train_v4_2x2x4.hlo.txt.gz" --top 15
