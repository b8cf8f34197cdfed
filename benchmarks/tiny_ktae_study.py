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
accuracy over training, i.e. sample efficiency). At the last step also greedy accuracy, mean
response length (tokens incl. EOS, greedy and T=1) and the mean number of shortcuts taken.

Primary endpoint, per task: final held-out accuracy at T=1, paired difference KTAE(released) -
GRPO, mean with 95% CI (paired t, 9 degrees of freedom). Secondary: the same for the AUC and for
greedy accuracy, for KTAE(beta=2), lengths, and RL vs the SFT control.

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

    .venv/bin/python benchmarks/tiny_ktae_study.py [--seeds 10] [--steps N] [--quick]
"""
