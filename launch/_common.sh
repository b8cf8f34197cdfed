# Helpers shared by the launch scripts (sourced, not run): printing and running commands,
# dry runs, argument checks. Every command a script runs goes through `run`, so a dry run
# prints exactly what a real run would execute, one `+ command` line each.

DRY_RUN=${DRY_RUN:-0}

die() {
  echo "$(basename "$0"): error: $*" >&2
  echo "Run '$(basename "$0") --help' for usage." >&2
  exit 2
}

# One word, quoted for a POSIX shell only when it needs it (so printed commands can be pasted).
# A leading `~/` stays bare: remote paths are meant to expand on the remote machine.
quote() {
  local word=$1
  if [[ $word =~ ^(~/)?[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

show() {
  local out="+" word
  for word in "$@"; do out+=" $(quote "$word")"; done
  echo "$out"
}

# Print the command; run it unless this is a dry run.
run() {
  show "$@"
  if [[ $DRY_RUN == 1 ]]; then return 0; fi
  "$@"
}

# A probe (does the TPU / bucket exist?): printed; a dry run assumes "no", so it shows the
# commands that would create things.
probe() {
  show "$@"
  if [[ $DRY_RUN == 1 ]]; then return 1; fi
  "$@" >/dev/null 2>&1
}

# `need_value FLAG "$#" NEXT`: FLAG must be followed by a value (not by another flag).
need_value() {
  [[ $2 -ge 2 && ${3:-} != --* ]] || die "$1 needs a value"
}

need_int() {  # need_int FLAG VALUE [MIN]
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"
  (( $2 >= ${3:-1} )) || die "$1 must be >= ${3:-1}, got $2"
}

need_file() {  # need_file FLAG PATH
  [[ -f $2 ]] || die "$1: no such file: $2"
}

# The package version this checkout pins (pyproject.toml), for installs on remote machines.
package_version() {
  local root=$1
  sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -n 1
}

# The jax version this checkout was developed with (its lower bound in pyproject.toml).
jax_version() {
  local root=$1
  sed -n 's/^ *"jax>=\([0-9.]*\)",*/\1/p' "$root/pyproject.toml" | head -n 1
}

# The compile-only fit check: `fit_check TARGET ktae-train-args...` compiles the run's programs for
# TARGET on this machine (no hardware: see `ktae-train --compile-only`) and stops the script if
# they do not fit, before anything is created or booked. It runs in dry runs too (it books
# nothing). NO_CHECK=1 (--no-check) skips it.
NO_CHECK=${NO_CHECK:-0}
fit_check() {
  local target=$1
  shift
  local cmd=(ktae-train "$@" --compile-only --target "$target")
  if [[ $NO_CHECK == 1 ]]; then
    echo "# fit check skipped (--no-check): $(show "${cmd[@]}" | sed 's/^+ //')"
    return 0
  fi
  command -v ktae-train >/dev/null ||
    die "the fit check needs ktae-train here: pip install '.[tpu,cuda]' from this checkout (or pass --no-check)"
  show "${cmd[@]}"
  local rc=0
  "${cmd[@]}" || rc=$?
  case $rc in
    0) echo "# fit check: the plan fits on $target" ;;
    1) echo "$(basename "$0"): error: the plan does not fit on $target (figures above); nothing was started" >&2
       exit 1 ;;
    *) die "the fit check for $target failed (ktae-train exit $rc; see above), or pass --no-check" ;;
  esac
}

# `gpu_model NAME`: the --compile-only name of a GPU from its nvidia-smi name (H100 -> h100).
gpu_model() {
  case ${1^^} in
    *H200*) echo h200 ;;
    *H100*) echo h100 ;;
    *A100*) echo a100 ;;
    *) return 1 ;;
  esac
}
