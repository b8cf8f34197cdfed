#!/usr/bin/env bash
# Training on one host with one or more GPUs: a single ktae-train process drives every visible
# GPU (the mesh spans them), so no distributed start-up is needed. See docs/launch.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu_single_host.sh --config FILE [--config FILE ...] --run-dir DIR [options]
                                 [-- ktae-train args]

Runs  ktae-train --config FILE... --run-dir DIR [ktae-train args]  with the chosen GPUs visible.
Rerunning with the same --run-dir resumes from its latest checkpoint.

Required:
  --config FILE        ktae-train YAML (repeat to merge, e.g. a recipe then configs/mesh/gpu_1x8.yaml)
  --run-dir DIR        run directory (checkpoints, metrics.jsonl, TensorBoard, the exported model)

Options:
  --gpus LIST          GPU indices to use, e.g. 0,1,2,3 (default: all; sets CUDA_VISIBLE_DEVICES)
  --venv DIR           Python environment holding ktae-jax (default: ktae-train on PATH)
  --setup              first create --venv and install jax[cuda12] and this checkout into it
  --jax-version V      jax version for --setup (default: the version this checkout pins)
  --mem-fraction F     share of each GPU's memory JAX may reserve (XLA_PYTHON_CLIENT_MEM_FRACTION)
  --gpu-type TYPE      h100, h200 or a100, for the fit check (default: from nvidia-smi)
  --no-check           skip the fit check
  --dry-run            print the commands (pip, ktae-train) without running them; only the fit check
                       runs: `ktae-train CONFIGS --compile-only --target TYPExN` (N: the GPUs used)
                       compiles the run here and refuses a plan that does not fit (real runs too)
  -h, --help           this help
USAGE
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=launch/_common.sh
source "$here/_common.sh"

run_dir="" gpus="" venv="" setup=0 jax_ver="" mem_fraction="" gpu_type=""
configs=() train_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --config) need_value "$1" $# "${2:-}"; configs+=("$2"); shift 2 ;;
    --run-dir) need_value "$1" $# "${2:-}"; run_dir=$2; shift 2 ;;
    --gpus) need_value "$1" $# "${2:-}"; gpus=$2; shift 2 ;;
    --venv) need_value "$1" $# "${2:-}"; venv=$2; shift 2 ;;
    --setup) setup=1; shift ;;
    --jax-version) need_value "$1" $# "${2:-}"; jax_ver=$2; shift 2 ;;
    --mem-fraction) need_value "$1" $# "${2:-}"; mem_fraction=$2; shift 2 ;;
    --gpu-type) need_value "$1" $# "${2:-}"; gpu_type=$2; shift 2 ;;
    --no-check) NO_CHECK=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done

[[ ${#configs[@]} -gt 0 ]] || die "--config is required"
[[ -n $run_dir ]] || die "--run-dir is required"
for c in "${configs[@]}"; do need_file --config "$c"; done
[[ -z $gpus || $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be comma-separated GPU indices, got '$gpus'"
[[ -z $mem_fraction || $mem_fraction =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction must be in (0, 1], got '$mem_fraction'"
[[ $setup == 0 || -n $venv ]] || die "--setup needs --venv DIR (where to install)"
if [[ $DRY_RUN != 1 ]] && ! command -v nvidia-smi >/dev/null; then
  die "nvidia-smi not found: this host has no NVIDIA driver (use launch/local_cpu.sh on CPU)"
fi
jax_ver=${jax_ver:-$(jax_version "$root")}

# Does the plan fit these GPUs? (The check sees the same memory fraction as the run.)
if [[ $NO_CHECK != 1 ]]; then
  if [[ -n $gpus ]]; then
    count=$(tr ',' '\n' <<< "$gpus" | wc -l)
  elif command -v nvidia-smi >/dev/null; then
    count=$(nvidia-smi -L | wc -l)
  else
    die "cannot tell how many GPUs the run uses: give --gpus (or --no-check)"
  fi
  if [[ -z $gpu_type ]]; then
    command -v nvidia-smi >/dev/null || die "give --gpu-type (h100, h200, a100) for the fit check, or --no-check"
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader | sed -n 1p)
    gpu_type=$(gpu_model "$name") || die "no compile target for GPU '$name': give --gpu-type or --no-check"
  fi
  [[ $gpu_type =~ ^(h100|h200|a100)$ ]] || die "--gpu-type must be h100, h200 or a100, got '$gpu_type'"
  check_args=()
  for c in "${configs[@]}"; do check_args+=(--config "$c"); done
  XLA_PYTHON_CLIENT_MEM_FRACTION=${mem_fraction:-${XLA_PYTHON_CLIENT_MEM_FRACTION:-}} \
    fit_check "${gpu_type}x$count" "${check_args[@]}" "${train_args[@]}"
fi

if [[ $setup == 1 ]]; then
  run python3 -m venv "$venv"
  run "$venv/bin/pip" install --quiet "jax[cuda12]==$jax_ver" "$root"
fi
env_vars=()
[[ -z $gpus ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")
[[ -z $mem_fraction ]] || env_vars+=("XLA_PYTHON_CLIENT_MEM_FRACTION=$mem_fraction")
train_bin=ktae-train
[[ -z $venv ]] || train_bin="$venv/bin/ktae-train"
cmd=("$train_bin")
for c in "${configs[@]}"; do cmd+=(--config "$c"); done
cmd+=(--run-dir "$run_dir" "${train_args[@]}")
if [[ ${#env_vars[@]} -gt 0 ]]; then
  run env "${env_vars[@]}" "${cmd[@]}"
else
  run "${cmd[@]}"
fi
