"""Fault drills: break real multi-process training jobs on purpose and check they fail well.

    python tools/fault_drill.py                    # every scenario, ~5 min on 2 CPU cores
    python tools/fault_drill.py --workdir /tmp/d   # keep the jobs' checkpoints and logs there

Each scenario is a real ``torchrun --nproc-per-node 4 pretrain_moe.py`` job on CPU (gloo) with a
tiny MoE (2 layers, hidden 64, 4 experts over EP=4, top-2, seq 64, dropout on) and short timeouts
(``--distributed-timeout-minutes 0.25``), run one after another, each under a hard wall-clock
limit (a hang is a failure with the job's output, never a stuck drill). Faults are triggered
deterministically with the test-only ``MONTA_FAULT_INJECT`` (:mod:`monta.training.fault_injection`:
rank R SIGKILLs itself entering phase P of iteration I), except SIGTERM, which the drill sends
to every worker like a scheduler's pre-emption notice. Every scenario asserts outcomes — exit
codes, message text, time to exit, checkpoint files and losses — not just that it ran.

Output: one line per scenario (name, PASS/FAIL, time to detect, what was checked or what went
wrong), then ``N passed, M failed``; the exit code is 1 if any failed.

The SIGKILL jobs form a chain on one ``--save`` directory, each resuming where the previous died,
so "resume after each kill reproduces the uninterrupted loss curve exactly" is checked on the
iterations each resumed job re-runs (TensorBoard's float32 values, compared with ==).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monta.testing.bad_inputs import DRILL_MODEL  # noqa: E402
from monta.testing.drill import (  # noqa: E402
    REPO,
    DrillFailure,
    Job,
    checkpoint_tensors_equal,
    dir_size,
    expect,
    fault_log,
    flip_byte,
    reap_leftovers,
    run_job,
    same_losses,
    scalars,
    tracker,
    worker_codes,
    worker_pids,
)
from monta.training import manifest  # noqa: E402

ITERS = 10
TIMEOUT_MIN = 0.25  # 15 s: the longest a phase may stall before a rank gives up
TIMEOUT_S = TIMEOUT_MIN * 60
JOB_LIMIT_S = 240  # hard wall-clock limit of one job (startup is most of it on 2 cores)
LAYOUT = ["--expert-model-parallel-size", "4", "--hidden-dropout", "0.1", "--attention-dropout",
          "0.1", "--global-batch-size", "8", "--train-iters", str(ITERS), "--lr-warmup-iters", "2",
          "--log-interval", "1", "--eval-iters", "0",
          "--distributed-timeout-minutes", str(TIMEOUT_MIN)]


@dataclass
class Result:
    name: str
    ok: bool
    detect: str
    detail: str


class Drill:
    def __init__(self, workdir: Path, data_prefix: str, tokenizer: str):
        self.work, self.data, self.tokenizer = workdir, data_prefix, tokenizer
        self.chain = workdir / "chain" / "ckpt"  # the SIGKILL chain's --save and --load
        self.reference: dict[int, float] = {}
        self.results: list[Result] = []
        self.jobs: dict[str, Job] = {}
        self.sigterm_signalled: float | None = None
        self.sigterm_iteration = 0
        self.nonfinite_job: Job | None = None

    # --- plumbing ------------------------------------------------------------------------

    def args(self, run: str, *extra: str) -> list[str]:
        return [*DRILL_MODEL, *LAYOUT, "--data-path", self.data, "--tokenizer-model",
                self.tokenizer, "--tensorboard-dir", str(self.work / run / "tb"), *extra]

    def job(self, run: str, *extra: str, env: dict | None = None, **kwargs) -> Job:
        log = self.work / run / "faults.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        job = run_job(self.args(run, *extra), JOB_LIMIT_S,
                      env={"MONTA_FAULT_LOG": str(log), **(env or {})}, **kwargs)
        (self.work / run / "output.log").write_text(job.output)
        self.jobs[run] = job
        expect(not job.timed_out, f"job {run} hit the {JOB_LIMIT_S} s hard limit (a hang):\n    "
                                  f"{job.tail()}")
        # a failed job must not leave anything running (a helper process of a killed rank...)
        leftovers = reap_leftovers(str(self.work / run))
        expect(not leftovers, f"job {run} left processes running (now killed): {leftovers}")
        return job

    def losses(self, run: str) -> dict[int, float]:
        return scalars(self.work / run / "tb", "lm loss")

    def scenario(self, name: str, body: Callable[[], tuple[str, str]]) -> bool:
        start = time.time()
        try:
            detect, detail = body()
            result = Result(name, True, detect, detail)
        except DrillFailure as failure:
            result = Result(name, False, "-", str(failure))
        except Exception as error:  # noqa: BLE001 - a drill bug is a failed scenario, with why
            result = Result(name, False, "-", f"{type(error).__name__}: {error}")
        self.results.append(result)
        status = "PASS" if result.ok else "FAIL"
        print(f"{name:34s} {status}  {result.detect:28s} {result.detail}  "
              f"[{time.time() - start:.0f} s]", flush=True)
        return result.ok

    # --- checks shared by the SIGKILL scenarios --------------------------------------------

    def killed(self, run: str, job: Job, victim: int, phase_text: str) -> tuple[str, str]:
        """Survivors each print one line naming the phase and the dead rank, within the
        timeout; the whole job exits non-zero within the timeout of the kill."""
        kills = fault_log(self.work / run / "faults.log")
        expect(len(kills) == 1 and kills[0]["rank"] == str(victim),
               f"expected rank {victim} to kill itself once, fault log: {kills}\n    {job.tail()}")
        killed_at = kills[0]["time"]
        expect(job.rc not in (0, None), f"job exited {job.rc} after a rank was killed")
        survivors = [r for r in range(4) if r != victim]
        lines = {r: job.first(rf"^rank {r}: .*exiting with code 3") for r in survivors}
        silent = [r for r, found in lines.items() if found is None]
        expect(not silent, f"survivor rank(s) {silent} printed no failure line:\n    {job.tail()}")
        for r, (_, line) in lines.items():
            expect(f"peer rank(s) {victim} likely" in line,
                   f"rank {r} did not name rank {victim}: {line}")
        expect(any(phase_text in line for _, line in lines.values()),
               f"no survivor named the phase {phase_text!r}: "
               f"{[line for _, line in lines.values()]}")
        detect = max(stamp for stamp, _ in lines.values()) - killed_at
        exit_s = job.ended - killed_at
        expect(exit_s <= TIMEOUT_S, f"job took {exit_s:.1f} s to exit after the kill (timeout "
                                    f"{TIMEOUT_S:.0f} s)")
        example = lines[survivors[0]][1].split(";")[0]
        return (f"detect {detect:.1f} s, exit {exit_s:.1f} s",
                f"ranks {survivors} named rank {victim} (e.g. '{example}')")

    def resumed(self, run: str, job: Job, start: int, iterations: list[int]) -> tuple[str, str]:
        expect(f"resumed from {self.chain / f'iter_{start:07d}'} at iteration {start}"
               in job.output, f"{run} did not resume from iteration {start}:\n    {job.tail()}")
        why = same_losses(self.reference, self.losses(run), iterations)
        expect(why is None, f"{run}: {why}")
        return "-", (f"resumed at {start}; iterations {iterations[0]}-{iterations[-1]} equal the "
                     f"uninterrupted run bit for bit")

    def intact(self, root: Path, iteration: int) -> None:
        expect(tracker(root) == iteration, f"tracker says {tracker(root)}, expected {iteration}")
        verdict = manifest.verify(str(root / f"iter_{iteration:07d}"))
        expect(verdict.ok, f"checkpoint {iteration} damaged: {verdict.summary()}")

    # --- scenarios -------------------------------------------------------------------------

    def reference_run(self) -> tuple[str, str]:
        job = self.job("reference", "--save", str(self.work / "reference" / "ckpt"),
                       "--save-interval", "2")
        expect(job.rc == 0, f"the uninterrupted run failed ({job.rc}):\n    {job.tail()}")
        self.reference = self.losses("reference")
        expect(sorted(self.reference) == list(range(1, ITERS + 1))
               and len(set(self.reference.values())) == ITERS,
               f"reference losses incomplete or flat: {self.reference}")
        return "-", f"{ITERS} iterations, loss {self.reference[1]:.3f} -> " \
                    f"{self.reference[ITERS]:.3f}"

    def chain_job(self, run: str, fault: str | None, *extra: str, **kwargs) -> Job:
        env = {"MONTA_FAULT_INJECT": fault} if fault else None
        return self.job(run, "--save", str(self.chain), "--load", str(self.chain),
                        "--save-interval", "2", "--keep-last", "3", *extra, env=env, **kwargs)

    def kill_mid_forward(self) -> tuple[str, str]:
        job = self.chain_job("kill_forward", "kill@rank=1,iter=3,phase=forward")
        result = self.killed("kill_forward", job, 1, "iteration 3")
        self.intact(self.chain, 2)
        return result

    def resume_after_forward(self) -> tuple[str, str]:
        job = self.chain_job("kill_dispatch", "kill@rank=2,iter=5,phase=dispatch,layer=2")
        return self.resumed("kill_dispatch", job, 2, [3, 4])

    def kill_mid_dispatch(self) -> tuple[str, str]:
        result = self.killed("kill_dispatch", self.jobs["kill_dispatch"], 2,
                             "MoE dispatch, layer 2 (forward), iteration 5")
        self.intact(self.chain, 4)
        return result

    def resume_after_dispatch(self) -> tuple[str, str]:
        job = self.chain_job("kill_save", "kill@rank=3,iter=6,phase=save_commit")
        return self.resumed("kill_save", job, 4, [5, 6])

    def kill_mid_save(self) -> tuple[str, str]:
        result = self.killed("kill_save", self.jobs["kill_save"], 3,
                             "checkpoint save (manifest and commit), iteration 6")
        self.intact(self.chain, 4)  # the torn save of 6 never became the checkpoint
        expect(not (self.chain / "iter_0000006").exists(), "a torn iter_0000006 was committed")
        return result[0], result[1] + "; tracker still 4, iter_0000004 verifies"

    def resume_after_save(self) -> tuple[str, str]:
        signalled: dict[str, float] = {}

        def preempt(line: str, process: subprocess.Popen) -> None:
            # like a scheduler's pre-emption notice: SIGTERM to every worker
            if "iteration        5/" in line and not signalled:
                signalled["at"] = time.time()
                for pid in worker_pids(process.pid):
                    os.kill(pid, signal.SIGTERM)

        job = self.chain_job("sigterm", None, "--exit-signal-handler", on_line=preempt)
        self.sigterm_signalled = signalled.get("at")
        found = job.first(r"exiting at iteration (\d+) \(SIGTERM\)")
        expect(found is not None, f"no 'exiting at iteration N (SIGTERM)' line (rc {job.rc}):"
                                  f"\n    {job.tail()}")
        self.sigterm_iteration = int(found[1].split("iteration ")[1].split()[0])
        return self.resumed("sigterm", job, 4, list(range(5, self.sigterm_iteration + 1)))

    def sigterm(self) -> tuple[str, str]:
        job, k = self.jobs["sigterm"], self.sigterm_iteration
        expect(self.sigterm_signalled is not None, "the drill never sent SIGTERM")
        expect(job.rc == 0, f"exit code {job.rc} after SIGTERM, expected 0")
        expect(5 <= k < ITERS, f"stopped at iteration {k}")
        self.intact(self.chain, k)
        expect(not list(self.chain.glob("*.tmp")), "a *.tmp save was left behind")
        exit_s = job.ended - self.sigterm_signalled
        # finishing the step and saving: within the usual 30 s grace of schedulers (SLURM's
        # KillWait) and torchrun (--shutdown-timeout)
        expect(exit_s <= 30, f"{exit_s:.1f} s from SIGTERM to exit")
        return f"exit {exit_s:.1f} s", f"saved iteration {k}, exit 0, manifest verifies"

    def corrupt_fallback(self) -> tuple[str, str]:
        k = self.sigterm_iteration
        previous = max(n for n in range(2, k) if (self.chain / f"iter_{n:07d}").is_dir())
        flip_byte(self.chain / f"iter_{k:07d}" / "__1_0.distcp")
        job = self.chain_job("fallback", None)
        expect(job.rc == 0, f"exit code {job.rc}:\n    {job.tail()}")
        warning = job.first(r"^warning: checkpoint .*failed verification")
        expect(warning is not None and "sha256 mismatch" in warning[1]
               and f"falling back to {self.chain / f'iter_{previous:07d}'}" in warning[1],
               f"no fallback warning naming the bad shard and iter_{previous:07d}:\n    "
               f"{job.tail()}")
        _, detail = self.resumed("fallback", job, previous, list(range(previous + 1, ITERS + 1)))
        kept = sorted(p.name for p in self.chain.glob("iter_*") if p.name[5:].isdigit())
        expect(len(kept) == 3 and kept[-1] == f"iter_{ITERS:07d}",
               f"--keep-last 3 left {kept}")
        return f"detect {warning[0] - job.started:.1f} s from start", \
            f"bit flip in iter_{k:07d} found; fell back to {previous}: {detail}; --keep-last 3 " \
            f"kept {', '.join(n[5:].lstrip('0') for n in kept)}"

    def corrupt_no_fallback(self) -> tuple[str, str]:
        newest = tracker(self.chain)
        shard = self.chain / f"iter_{newest:07d}" / "__2_0.distcp"
        flip_byte(shard, 0.25)
        before = sorted(p.name for p in self.chain.iterdir())
        job = self.chain_job("no_fallback", None, "--no-load-fallback")
        expect(job.rc not in (0, None) and worker_codes(job) == {2},
               f"exit code {job.rc}, ranks {worker_codes(job)}:\n    {job.tail()}")
        error = job.first(r"^error: checkpoint .*failed verification")
        expect(error is not None and "sha256 mismatch" in error[1] and "__2_0.distcp" in error[1],
               f"no error naming the bad shard:\n    {job.tail()}")
        expect("resumed from" not in job.output, "it loaded the bad checkpoint anyway")
        expect(sorted(p.name for p in self.chain.iterdir()) == before
               and tracker(self.chain) == newest, "files changed")
        tool = subprocess.run([sys.executable, str(REPO / "tools" / "checkpoint_verify.py"),
                               str(self.chain)], capture_output=True, text=True, timeout=120)
        expect(tool.returncode == 1 and f"iter_{newest:07d} FAIL" in tool.stdout
               and "__2_0.distcp: sha256 mismatch" in tool.stdout,
               f"checkpoint_verify.py: rc {tool.returncode}, {tool.stdout}")
        return f"detect {error[0] - job.started:.1f} s from start", \
            f"ranks exit 2: '{error[1][7:110]}…'; checkpoint_verify.py exits 1 naming it"

    def disk_full(self) -> tuple[str, str]:
        one = dir_size(self.work / "reference" / "ckpt" / "iter_0000002")
        mount = self.work / "disk_full" / "mnt"
        copy = self.work / "disk_full" / "copy"
        mount.mkdir(parents=True)
        copy.mkdir()
        size_kb = int(one * 1.6) // 1024
        probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                                f"mount -t tmpfs -o size={size_kb}k tmpfs {mount}"],
                               capture_output=True, text=True)
        flags = ["--save", str(mount), "--save-interval", "2"]
        if probe.returncode == 0:
            how = f"tmpfs of {size_kb} kB (1.6 checkpoints)"

            def in_namespace(command: str) -> list[str]:
                # the tmpfs lives in the job's mount namespace: copy the result out before it ends
                return ["unshare", "-rm", "sh", "-c",
                        f"mount -t tmpfs -o size={size_kb}k tmpfs {mount} && {command}; rc=$?; "
                        f"cp -a {mount}/. {copy}/; exit $rc"]

            job = self.job("disk_full", *flags, shell=in_namespace)
        else:
            how = f"injected ENOSPC (unshare failed: {probe.stderr.strip()[:60]})"
            job = self.job("disk_full", "--save", str(copy), "--save-interval", "2",
                           env={"MONTA_FAULT_INJECT": "diskfull@iter=4"})
        error = job.first(r"^error: checkpoint save of iteration 4 .*failed")
        expect(job.rc not in (0, None) and error is not None
               and "no space left on" in error[1].lower() and "iter_0000002, is untouched"
               in error[1], f"rc {job.rc}, no clear disk-full error:\n    {job.tail()}")
        expect(worker_codes(job) == {2}, f"ranks exited {worker_codes(job)}, expected 2")
        self.intact(copy, 2)
        expect(not (copy / "iter_0000004").exists() and not list(copy.glob("*.tmp")),
               f"half-written save left: {sorted(p.name for p in copy.iterdir())}")
        return "-", f"{how}: ranks exit 2, '{error[1][7:80]}…'; iter_0000002 intact"

    def nonfinite(self) -> tuple[str, str]:
        """NaN out of decoder layer 1 on rank 2 only at iteration 3 (skipped, training goes on),
        then on every rank from iteration 6 (aborts after 3 in a row, saving the last good
        state); routers collapse onto experts 0-1 for iterations 1-2 with a capacity factor."""
        root = self.work / "nonfinite" / "ckpt"
        job = self.job("nonfinite", "--save", str(root), "--save-interval", "5",
                       "--max-consecutive-nonfinite", "3", "--moe-expert-capacity-factor", "1.0",
                       env={"MONTA_FAULT_INJECT": "nan@iter=3,layer=1,rank=2;"
                                                  "nan@iter=6,layer=1,count=100;"
                                                  "collapse@iter=1,count=2"})
        self.nonfinite_job = job
        expect(job.rc not in (0, None) and worker_codes(job) == {4},
               f"expected ranks to exit 4, got {worker_codes(job)}:\n    {job.tail()}")
        skip = job.first(r"^ iteration 3: non-finite lm loss nan .*step skipped")
        expect(skip is not None, f"no skip warning at iteration 3:\n    {job.tail()}")
        losses = scalars(self.work / "nonfinite" / "tb", "lm loss")
        expect(all(i in losses for i in (4, 5)), f"training did not go on after the skip: {losses}")
        logged = job.first(r"iteration        5/.*skipped iterations: 1 \|")
        expect(logged is not None, "'skipped iterations: 1' not logged at iteration 5")
        error = job.first(r"^error: 3 consecutive iterations \(6-8\) had a non-finite")
        expect(error is not None and "weights and optimizer from iteration 5" in error[1],
               f"no abort message:\n    {job.tail()}")
        expect(job.first(r"iteration        8/.*skipped iterations: 4 \|") is not None,
               "'skipped iterations: 4' not logged at iteration 8")
        expect(tracker(root) == 8, f"abort saved no checkpoint (tracker {tracker(root)})")
        same = checkpoint_tensors_equal(root / "iter_0000005", root / "iter_0000008")
        expect(same is None, f"the abort checkpoint is not the last good state: {same}")
        return "-", ("iteration 3 skipped and training went on; 6-8 skipped, exit 4, iter_8 "
                     "holds exactly iteration 5's weights and optimizer state")

    def collapse(self) -> tuple[str, str]:
        job = self.nonfinite_job
        for i in (1, 2):
            line = job.first(rf"iteration {i:8d}/.*dropped tokens: (\d+) \(50\.0%\)")
            expect(line is not None, f"iteration {i}: 50% dropped tokens not logged")
        tb = self.work / "nonfinite" / "tb"
        empty = [e for e in (2, 3) for i in (1, 2)
                 if scalars(tb, f"expert-load/layer1/expert{e}").get(i) != 0.0]
        expect(not empty, f"experts 2-3 (ranks 2-3) got tokens during the collapse: {empty}")
        return "-", "all tokens on experts 0-1, ranks 2-3 empty, 50% dropped (logged), no crash"

    def frozen_rank(self) -> tuple[str, str]:
        frozen: dict[str, int] = {}
        log = self.work / "frozen" / "faults.log"

        def release(line: str, process: subprocess.Popen) -> None:
            # once the survivors have spoken, the frozen rank is a vanished node: gone
            if line.startswith("rank ") and "exiting with code 3" in line:
                frozen["lines"] = frozen.get("lines", 0) + 1
                entries = fault_log(log)
                if frozen["lines"] == 3 and entries:
                    os.kill(int(entries[0]["pid"]), signal.SIGKILL)

        job = self.job("frozen", env={"MONTA_FAULT_INJECT":
                                      "kill@rank=1,iter=2,phase=combine,layer=1,signal=STOP"},
                       on_line=release)
        entries = fault_log(log)
        expect(len(entries) == 1, f"rank 1 did not freeze: {entries}\n    {job.tail()}")
        # the watchdog ("timed out, no progress") or gloo ("collective timed out"), whichever
        # notices first: both wait out the same timeout
        lines = [job.first(rf"^rank {r}: .*timed out") for r in (0, 2, 3)]
        expect(all(lines), f"survivors did not all report a timeout:\n    {job.tail()}")
        for _, line in lines:
            expect("peer rank(s) 1 likely hung or died" in line and "is stopped" in line,
                   f"rank 1 not named as stopped: {line}")
        detect = max(stamp for stamp, _ in lines) - entries[0]["time"]
        expect(detect <= TIMEOUT_S + 5, f"{detect:.1f} s to detect (timeout {TIMEOUT_S:.0f} s)")
        expect(job.rc not in (0, None), f"exit code {job.rc}")
        return f"detect {detect:.1f} s", (f"no error from a SIGSTOPped peer: the {TIMEOUT_S:.0f} s "
                                          f"timeout fired on ranks 0,2,3, naming rank 1 as "
                                          f"stopped")

    def bad_config_torchrun(self) -> tuple[str, str]:
        job = self.job("bad_config", "--num-experts", "6")
        errors = job.all(r"^error: ")
        expect(job.rc not in (0, None) and worker_codes(job) == {2} and len(errors) == 1
               and "--num-experts 6 is not divisible by --expert-model-parallel-size 4"
               in errors[0][1], f"rc {job.rc}, errors {errors}:\n    {job.tail()}")
        expect("parallel layout" not in job.output, "it got past the preflight")
        return f"exit {job.ended - job.started:.1f} s", f"4 ranks, one line: '{errors[0][1][:70]}'"

    def bad_inputs(self) -> tuple[str, str]:
        workdir = self.work / "bad_inputs"
        workdir.mkdir()
        run = subprocess.run(
            [sys.executable, "-m", "monta.testing.bad_inputs", "--workdir", str(workdir),
             "--data-prefix", self.data, "--tokenizer-model", self.tokenizer, "--checkpoint",
             str(self.work / "reference" / "ckpt")],
            cwd=REPO, capture_output=True, text=True, timeout=JOB_LIMIT_S,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        bad = [f"{r['name']}: exit {r['code']}, "
               + ("reached a collective" if r["reached_collective"] else
                  f"missing {r['missing_fragments']} in {r['message']}")
               for r in results if r["code"] != 2 or r["reached_collective"]
               or r["missing_fragments"]]
        expect(run.returncode == 0 and len(results) >= 25 and not bad,
               f"{len(results)} cases, failures: {bad}; {run.stderr[-500:]}")
        return "-", (f"{len(results)}/{len(results)} refused through the CLI with exit 2 and a "
                     f"message naming the flag or file, before any collective")


SCENARIOS = [
    # (name, method, scenarios it needs to have passed first)
    ("uninterrupted-reference-run", "reference_run", ()),
    ("sigkill-mid-forward", "kill_mid_forward", ("uninterrupted-reference-run",)),
    ("resume-after-sigkill-mid-forward", "resume_after_forward", ("sigkill-mid-forward",)),
    ("sigkill-mid-dispatch", "kill_mid_dispatch", ("resume-after-sigkill-mid-forward",)),
    ("resume-after-sigkill-mid-dispatch", "resume_after_dispatch", ("sigkill-mid-dispatch",)),
    ("sigkill-mid-save", "kill_mid_save", ("resume-after-sigkill-mid-dispatch",)),
    ("resume-after-sigkill-mid-save", "resume_after_save", ("sigkill-mid-save",)),
    ("sigterm-checkpoint-then-exit", "sigterm", ("resume-after-sigkill-mid-save",)),
    ("bit-flipped-shard-falls-back", "corrupt_fallback", ("sigterm-checkpoint-then-exit",)),
    ("bit-flipped-shard-no-fallback", "corrupt_no_fallback", ("bit-flipped-shard-falls-back",)),
    ("disk-full-during-save", "disk_full", ("uninterrupted-reference-run",)),
    ("nan-step-skipped-then-abort", "nonfinite", ()),
    ("router-collapse-capacity-overflow", "collapse", ("nan-step-skipped-then-abort",)),
    ("rank-frozen-timeout", "frozen_rank", ()),
    ("invalid-config-4-ranks", "bad_config_torchrun", ()),
    ("invalid-inputs-cli", "bad_inputs", ("uninterrupted-reference-run",)),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="keep jobs' files here (default: temp)")
    parser.add_argument("--data-path", default=str(REPO / "data" / "bundled_text_document"),
                        help="indexed dataset prefix (make data builds the default)")
    parser.add_argument("--tokenizer-model",
                        default=str(REPO / "monta" / "data" / "bundled" / "tokenizer.model"))
    parser.add_argument("--only", nargs="+", default=None, metavar="SCENARIO",
                        help="run these scenarios (and the ones they build on); names as printed")
    args = parser.parse_args(argv)
    wanted = {name for name, _, _ in SCENARIOS}
    if args.only:
        needs = {name: deps for name, _, deps in SCENARIOS}
        unknown = set(args.only) - wanted
        if unknown:
            parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {sorted(wanted)}")
        wanted, todo = set(), list(args.only)
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.extend(needs[name])
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="monta-drill-") as tmp:
        workdir = Path(args.workdir or tmp)
        if args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        drill = Drill(workdir, args.data_path, args.tokenizer_model)
        passed: set[str] = set()
        for name, method, needs in SCENARIOS:
            if name not in wanted:
                continue
            missing = [n for n in needs if n not in passed]
            if missing:
                drill.results.append(Result(name, False, "-", f"not run: {missing[0]} failed"))
                print(f"{name:34s} FAIL  {'-':28s} not run: {missing[0]} failed", flush=True)
                continue
            if drill.scenario(name, getattr(drill, method)):
                passed.add(name)
    failed = sum(not r.ok for r in drill.results)
    print(f"{len(drill.results) - failed} passed, {failed} failed "
          f"({time.time() - started:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
