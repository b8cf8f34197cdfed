"""Does KTAE help? GRPO vs GRPO+KTAE, paired over seeds, on tiny tasks decided mid-response (issue 17).

DESIGN AND HYPOTHESES (written and committed before any run of this study; not tuned afterwards)
=================================================================================================

Why new tasks. On the shipped tiny task the first response token ("Sum:" / "Guess:") decides the
style; sequence-level GRPO credits that token well, and the earlier 3-seed study could not tell
the methods apart (spread 0.09-0.13). The paper's claim is that token-level credit helps where
the deciding tokens are somewhere inside the response. So the study uses two variants
(`ktae_jax/tiny/variants.py`), each with its own base trained exactly like the shipped one
(`PretrainConfig` defaults, seed 0, on that variant's teacher data; `ktae_jax/tiny/bases/`):

  late   3 terms; a common prefix (the first partial sum) THEN the choice: write the last partial
         sum (teacher always right) or "Guess:" the total (teacher wrong half the time). One
         decision, made at the 7th-8th response token.
  steps  4 terms; at each of the 3 running sums the choice between writing the addition out
         (verbose, always right) and jumping with "~" (terse, wrong half the time; errors carry).
         Three decisions spread through the response; verbose = reliable, terse = unreliable.

Arms (every arm starts from the variant's base):
  GRPO          configs/tiny.yaml's recipe: 16 prompts x 8 rollouts per step, temperature 1,
                reward 1/0 (exact `\\boxed{}` answer), GRPO z-score advantage, token-mean loss,
                no KL, AdamW lr 3e-4 (b2 0.999, no weight decay), clip-by-norm 1, one on-policy
                update per batch (so the clipped surrogate's gradient is the policy gradient).
  KTAE (released) GRPO + KTAE key scores at the released runs' values (shared/KTAE_SPEC.md,
                configs/paper/parts/ktae.yaml): alpha = beta = gamma = top = 1, k1 = 2, b = 0.5,
                zero_fisher_at_p1, pad and EOS ignored.
  KTAE (beta=2) the one other setting, named in advance: beta = 2 (the information-gain weight the
                paper's launch scripts pass as beta_ig=2.0, which the released code never reads);
                everything else as released.
  SFT control   the same compute spent on supervised training instead: from the base, fresh
                teacher data (seed 1000 + seed), batch 64, AdamW lr 3e-4, for as many steps as
                cost the CPU time of that seed's GRPO run (process CPU seconds, evaluations and
                compilation excluded).
All RL arms share the compiled functions; ktae_jax's own sampler (`sample.sample_jit`),
advantages (`advantages.token_advantages`, KTAE from `ktae.py`) and log-probs
(`models.token_logprobs`) do the work; the loop here only strings them together.

Pairing. Seeds 0-9 (n = 10 per task and arm). The seed fixes the stream of training prompts
(identical for every arm at every step) and the sampling keys, so each KTAE run is paired with
the GRPO run of the same seed. Held-out: 1,000 test-split problems per task (a fixed draw, the
same for every run); the test split is never used for training data.

Measurements. Held-out accuracy at temperature 1 (one sample per problem, sampling key fixed
per (seed, step), the same for every arm) every `--eval-every` steps including step 0 (the
base) = the learning curve; its area (trapezoid, normalised by the number of steps: the mean
accuracy over training, i.e. sample efficiency). At the last step also the mean response length
(tokens incl. EOS, T=1) and the mean number of shortcuts taken (greedy: see the amendment).

Primary endpoint, per task: final held-out accuracy at T=1, paired difference KTAE(released) -
GRPO, mean with 95% CI (paired t, 9 degrees of freedom). Secondary: the same for the AUC, for
KTAE(beta=2), lengths, and RL vs the SFT control.

Hypotheses (the paper's claims, and our prior):
  H1 KTAE(released) > GRPO in final accuracy on both tasks (paper). Our prior: no detectable
     difference on `late` (one decision, as on the shipped task; GRPO's sequence-level credit of
     a single choice is already right in expectation); KTAE ahead on `steps`, where a response
     makes three choices and GRPO credits all of them with one reward while KTAE scores "~" by
     its association with wrong answers in each group.
  H2 KTAE(released) learns faster: AUC higher (paper: sample efficiency), on `steps` at least.
  H3 KTAE gives shorter responses (paper). Here the only short responses are the unreliable
     ones, so we expect both methods to LENGTHEN responses (drop shortcuts) and no shorter
     responses from KTAE unless it also loses accuracy.
  H4 Both RL arms beat the equal-compute SFT control (its teacher keeps taking shortcuts).
  H5 KTAE(beta=2) behaves like KTAE(released) (the key score's sign, which is what moves the
     policy, does not depend on beta).
Decision rule: "helps" if the 95% CI of the paired difference lies above 0, "hurts" if below,
otherwise "no difference detected", with the CI's half-width as the size this study can resolve.

Budget: the whole study under 60 minutes of this 2-core machine, judged as (user + sys CPU
seconds) / 2; the script reports its own CPU and wall time. The number of steps and the
evaluation interval were set from the timing of a step (no accuracy looked at) before the runs.

Amendment before any study run, from timing alone (a 5-step GRPO run of the shipped base: an
RL step costs ~1 CPU s, one 1,000-item held-out evaluation ~5 CPU s; the machine ran at a load
of ~12 on 2 cores, so wall time, not the 60-minute CPU budget, was the binding limit):
  * 12 RL steps per run, held-out evaluation every 6 steps (steps 0, 6, 12): the 5-step
    timing run's training reward and greedy accuracy moved within 5 steps, and at a measured
    ~0.2-0.45 of a core available to this study (load 12-21), 12 steps and two evaluations per
    run are what lets the primary comparison (40 runs) and most of the rest finish before the
    day's deadline;
  * the final greedy accuracy is measured for the bases only (the endpoints are at T=1);
  * run order: GRPO and KTAE (released) for all seeds first, then per seed the SFT control and
    KTAE (beta=2), so that a study cut short by the deadline still has complete pairs;
  * each task's seeds are split over three processes (0-3, 4-6, 7-9) run side by side (CPU time
    is summed over all of them; each compiles once). A first launch with one process per task
    was stopped after one run (late, seed 0, GRPO) when its pace showed it could not finish.

What happened in the run (recorded as it happened, 19:24 UTC): the `steps` base turned out
broken: 0.7% held-out accuracy (its teacher: 42%), so nearly every group is all-wrong and neither
method gets a signal (GRPO runs stayed at 0.4-0.6%). Its 200-step continuation from the shipped
base was too short for 4-term sums; fixing it (a longer base build) did not fit the day, so its
processes were stopped and the `steps` task is reported as not measured. Their CPU went to three
extra `late` processes (`--second-only`) running the SFT control (budget fixed at 17 CPU s, the
measured GRPO training CPU time of seeds 0, 4 and 7) and KTAE (beta=2) for seeds 0-2, 4-5, 7-8
(seed 2's beta=2 run did not finish: beta=2 has seeds 0, 1, 4, 5, 7, 8; SFT 0-2, 4-5, 7-8).

AMENDMENT, 1 December 2026, 21:35 UTC: a base-quality fix for `steps`, written before its new
base's accuracy was measured and before any `steps` RL run of it (no `steps` RL result exists;
the stopped runs of the broken base were never evaluated against each other). Nothing about the
task, the arms, the measurements or the decision rule changes:
  * the `steps` base is rebuilt with 800 supervised steps instead of 200 (`variants.BASE_RECIPES`;
    same start from the shipped base, learning rate, warm-up, seed 0; the cosine decay spans the
    800 steps). Its loss curve was still falling at step 200 (0.51; the variant's irreducible
    loss, from its random choices, is ~0.08 per token);
  * acceptance test, fixed now and applied before any RL run: held-out accuracy at T=1 (1,000
    test problems, `--base-only`) between 15% and 70% with shortcuts still taken (so that groups
    are mixed and RL has something to learn; the teacher: 42%). If it failed, the base would be
    built longer again (the same rule), never tuned against an RL result;
  * the base's second build must give the same bytes (sha256) as the first, and so must a second
    build of `late` (its shipped hash);
  * then the `steps` arms for seeds 0-9 in the design's order, in three processes (seeds 0-3,
    4-6, 7-9), the SFT budget being each seed's own GRPO training CPU time; and the `late`
    task's missing runs (KTAE beta=2 seeds 2, 3, 6, 9; SFT seeds 3, 6, 9, budget = that seed's
    recorded GRPO CPU time) in one process with `--resume docs/study/late_*.json`, which skips the
    runs those files already hold. The CPU of the bases' builds is not part of the study's budget
    (they are shipped artefacts, built once); it is recorded in bases/BUILD.md.
  Outcome, 21:50 UTC: the 800-step base FAILED the acceptance test (T=1 4.8%, greedy 6.5%;
  shortcut-free responses only 6% right: it mis-copies the third and fourth terms, e.g.
  "98+45=143, 143+87=221" for 98+45+85+39; final loss 0.27, flat as the 1e-3 cosine decayed).
  Second and last attempt, by the same rule and again before any RL run: 1,000 steps at the
  shipped base's own peak learning rate 3e-3 (warm-up 20, cosine to 10%), the only other change.
  (Found in passing: a second build of `late` gave its shipped bytes, 6d65c64f...)
  Outcome, 22:12 UTC: the 1,000-step base FAILED as well (T=1 3.9%, greedy 4.9%; shortcut-free
  responses 7% right at T=1; final loss 0.25). As fixed at 21:50, no third attempt: the
  `steps` task is NOT MEASURED, no `steps` RL run was made, and the 200-step recipe and its
  shipped bytes stay (a second build of it gave them again, 75563048...; BUILD.md records both
  failed recipes and their figures). What remains of the study is `late`, completed to 10 seeds
  in every arm by one `--resume` process; `--tasks` now defaults to `late` (`--tasks late,steps`
  still runs both).

AMENDMENT, 1 December 2026, 22:30 UTC: a replacement second task, `steps3`, registered before
its base was measured (its build had just started) and before any RL run on it:
  * task: the `steps` design on THREE 2-digit terms (`variants.py`): two running sums, at each
    the addition written out ("47+85=132", always right) or a jump with "~" (wrong half the time:
    the true total rounded to ten, as the shipped wrong guess; errors carry), e.g.
    "47+85=132, ~200. \\boxed{200}". Two decisions, the first at the first response token, the
    second in the middle of the response after the first running sum. Teacher accuracy
    (3/4)^2 ~ 56%. Why three terms: the shipped base already adds three terms (its "Sum:" style is
    ~61% right at T=1), while no `steps` base learnt to copy a 3rd and 4th term;
  * it REPLACES `steps` as the study's second task (`steps` stays in the code, documented as
    failed; none of its RL runs exists);
  * base: `BASE_RECIPES["steps3"]`, the same recipe as `late` (from the shipped base, 200 steps
    of 64, lr 1e-3, warm-up 20, cosine to 10%, seed 0);
  * acceptance test, the one already used: held-out accuracy at T=1 (1,000 test problems,
    `--base-only`) between 15% and 70%. If it fails, the task is recorded as not measured (no
    further attempt, no tuning);
  * hypotheses H1-H5 as written above for `steps`, now for `steps3`: H1 our prior is KTAE ahead
    (two choices per response, one reward), H2 KTAE's AUC higher, H3 both methods lengthen
    responses and KTAE is not shorter unless it loses accuracy, H4 both RL arms beat SFT, H5
    beta=2 like released; the decision rule is unchanged;
  * runs: seeds 0-9, 12 steps, evaluations at 0, 6, 12, the arms in the design's order (GRPO and
    KTAE (released) for every seed first, then SFT and KTAE (beta=2)), in several processes side
    by side with `--resume`; what does not finish by the day's deadline is reported with its n.
  Outcome, 22:39 UTC: the `steps3` base (built twice, same bytes de7e83b9...; final loss 0.210)
  FAILED the acceptance test: held-out accuracy at T=1 13.3% (greedy 29.3%; 72% of T=1 responses
  take a shortcut, 0.96 per response, the teacher 1.0; shortcut-free T=1 responses 38.6% right,
  greedy 73%; responses with a shortcut ~3.5% right at T=1, the teacher's ~42%). As registered, no
  further attempt and no `steps3` RL run: `steps3` is NOT MEASURED, and the study's result rests
  on `late` alone (`docs/study/steps3_base.json`: the acceptance measurement).

AMENDMENT, 1 December 2026, 22:45 UTC (the lead's decision): the `steps3` base is run although
it is below the registered 15% floor. Disclosed plainly: this was decided AFTER seeing the base's
13.3% and BEFORE any RL result on `steps3` (no `steps3` RL run existed; no method comparison had
been seen, so the decision cannot favour either method). Why: the 15% floor was a proxy for "RL
groups are mixed (neither all right nor all wrong) often enough to learn from". At p = 0.133 a
group of 8 rollouts is mixed with probability 1 - 0.867^8 - 0.133^8 ~ 68%, so the base does give
RL a signal; the floor is lowered to what it stood for. NOTHING ELSE CHANGES: the arms, seeds 0-9,
12 steps, evaluations at 0, 6, 12, the measurements, H1-H5 and the decision rule are as registered
at 22:30. Runs: two processes side by side (seeds 0-4, 5-9) with `--resume`, GRPO and KTAE
(released) first for every seed, then SFT (budget: that seed's GRPO training CPU time) and KTAE
(beta=2); new work stops being launched at ~23:25 UTC and whatever finished is reported with its n.
  Outcome, 23:04 UTC: all 40 `steps3` runs finished (n = 10 in every arm; `docs/study/steps3_*.json`,
  1,011 CPU s in two processes, ~18 minutes of wall time). Primary endpoint, KTAE(released) - GRPO
  final T=1 accuracy: -0.005 [-0.047, +0.036], no difference detected; AUC -0.008 [-0.035, +0.018];
  length +0.12 tokens [-0.01, +0.26]; SFT - GRPO -0.045 [-0.087, -0.004]; beta=2 - released
  -0.004 [-0.025, +0.016] (README: the full tables).

    .venv/bin/python benchmarks/tiny_ktae_study.py [--tasks late,steps3] [--seeds 10] [--steps N] [--quick]
    .venv/bin/python benchmarks/tiny_ktae_study.py --tasks steps3 --base-only     # a base's held-out figures
    .venv/bin/python benchmarks/tiny_study_report.py docs/study/late_*.json docs/study/steps3_*.json   # tables, plots
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import resource
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

ARMS = ("GRPO", "KTAE (released)", "KTAE (beta=2)")


def ktae_configs(pad: int, eos: int) -> dict:
    """The arms' KTAE settings (None = plain GRPO), named in the design above."""
    from ktae_jax.ktae import KTAEConfig

    released = KTAEConfig(alpha=1.0, beta=1.0, gamma=1.0, top=1.0, k1=2.0, b=0.5, zero_fisher_at_p1=True,
                          ignore_token_ids=(pad, eos))
    return {"GRPO": None, "KTAE (released)": released, "KTAE (beta=2)": dataclasses.replace(released, beta=2.0)}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


SFT = "SFT (same compute)"


def load_done(paths: list[str]) -> tuple[set, dict]:
    """Runs already in earlier `study.json` files (--resume): {(task, arm, seed)} and each
    (task, seed)'s GRPO training CPU seconds (the SFT control's budget)."""
    done, grpo_cpu = set(), {}
    for path in paths:
        try:
            one = json.loads(pathlib.Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--resume {path}: cannot read a study.json ({exc})")
        for name, task in one.get("tasks", {}).items():
            for arm, runs in task.get("runs", {}).items():
                for r in runs:
                    done.add((name, arm, r["seed"]))
                    if arm == "GRPO":
                        grpo_cpu.setdefault((name, r["seed"]), r["cpu_s"])
    return done, grpo_cpu


def run_task(name: str, args, results: dict, save, done: set, grpo_cpu: dict) -> None:
    from tiny_study_loop import Rig, eval_key, rl_run, sft_run, warm_up

    rig = Rig(name, args.held_out)
    arms = ktae_configs(rig.pad, rig.eos)
    task = results["tasks"].setdefault(name, {"runs": {a: [] for a in (*ARMS, SFT)}})
    task["base"] = {"sampled": rig.evaluate(rig.base, eval_key(0, 0))}
    if args.seed_start == 0 or args.base_only:  # one process per task measures the base's greedy decoding
        task["base"]["greedy"] = rig.evaluate(rig.base, eval_key(0, 0), greedy=True)
    save()
    if args.base_only:
        return
    task.update(warm_up(rig, list(arms.values())))

    def rl(seed: int, arm: str) -> None:
        if (name, arm, seed) in done:
            return
        r = rl_run(rig, seed, args.steps, args.eval_every, arms[arm], base_eval=task["base"]["sampled"])
        task["runs"][arm].append({"seed": seed, **dataclasses.asdict(r)})
        if arm == "GRPO":
            grpo_cpu[(name, seed)] = r.cpu_s
        print(f"{name} seed {seed} {arm}: T=1 {r.final_sampled['accuracy']:.3f} cpu {r.cpu_s:.1f}s", flush=True)
        save()

    def sft(seed: int) -> None:
        if (name, SFT, seed) in done:
            return
        # the budget: this seed's GRPO training CPU time (this process or --resume), else --sft-cpu-s
        budget = args.sft_cpu_s if args.second_only else grpo_cpu.get((name, seed), args.sft_cpu_s)
        r, steps = sft_run(rig, seed, budget)
        task["runs"][SFT].append({"seed": seed, "sft_steps": steps, "cpu_budget_s": budget, **dataclasses.asdict(r)})
        print(f"{name} seed {seed} SFT ({steps} steps): T=1 {r.final_sampled['accuracy']:.3f}", flush=True)
        save()

    # Priority order, so that a study cut short still has whole pairs: the primary comparison for
    # every seed first, then the SFT control and the second KTAE setting.
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    if not args.second_only:  # --second-only: the SFT control (budget --sft-cpu-s) and KTAE (beta=2) only
        for seed in seeds:
            rl(seed, "GRPO"), rl(seed, "KTAE (released)")
    for seed in seeds:
        sft(seed)
        rl(seed, "KTAE (beta=2)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--seed-start", type=int, default=0, help="seeds seed_start .. seed_start + seeds - 1 "
                        "(split the seeds over processes; the report merges their study.json files)")
    parser.add_argument("--steps", type=int, default=12, help="RL steps per run")
    parser.add_argument("--eval-every", type=int, default=6, help="held-out evaluation interval (steps)")
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--second-only", action="store_true", help="only the SFT control and KTAE (beta=2)")
    parser.add_argument("--sft-cpu-s", type=float, default=17.0, help="SFT budget with --second-only (CPU s)")
    parser.add_argument("--tasks", default="late", help="comma-separated (late, steps, steps3); steps has no usable base, steps3 runs under the 22:45 amendment")
    parser.add_argument("--resume", nargs="*", default=[], metavar="STUDY_JSON",
                        help="earlier study.json files: skip the (task, arm, seed) runs they hold")
    parser.add_argument("--base-only", action="store_true", help="only measure the bases (T=1 and greedy)")
    parser.add_argument("--out", default="runs/study", help="results folder (relative: to the repository)")
    parser.add_argument("--plots", default="docs/study", help="folder for the PNGs (relative: to the repository)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 4 steps, 100 held-out")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.held_out = 2, 4, 2, 100
        args.plots = str(pathlib.Path(args.out) / "plots")
    out = REPO / args.out  # an absolute --out stays as given
    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": vars(args), "tasks": {}}
    cpu0, wall0 = cpu_seconds(), time.perf_counter()

    def save() -> None:
        results["cpu_s"], results["wall_s"] = cpu_seconds() - cpu0, time.perf_counter() - wall0
        (out / "study.json").write_text(json.dumps(results, indent=1))

    done, grpo_cpu = load_done(args.resume)
    for name in args.tasks.split(","):
        run_task(name, args, results, save, done, grpo_cpu)
    save()
    from tiny_study_report import report

    print(report([results], REPO / args.plots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
