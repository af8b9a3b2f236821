"""Continual mode: a trainer process beside the loop that retrains from the newest logs and
deploys the result, but only through an evaluation gate.

Every ``every_transitions`` newly committed transitions it runs ``ddpg retrain`` on the whole
log (continuing from the last deployed candidate, or from ``init``), then evaluates the
candidate and the live actor in its own simulator on the same seeds (``evaluate`` with a fresh
environment: what a lockstep bridge measures, and bit-identical to it). It deploys through the
node's admin socket only if the candidate's mean return is not worse than the live actor's by
more than ``margin``. Every decision is appended to ``OUT_DIR/decisions.jsonl`` with its figures.

This process imports torch (it trains); it is started by ``ddpg launch`` as its own process
(``python -m training.continual LAUNCH.yaml``), so the serving path stays torch-free, and talks to
the node only as a client of its admin socket. The init run's config is checked at start: a
malformed one stops this process with one line, before the first round; ``--check`` does only
that check, which ``ddpg launch --continual`` runs before it starts anything.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from control_node.admin import AdminError, request
from control_node.config import ConfigError, load_launch
from control_node.decisions import append_decision
from training.config import load_config

POLL_S = 0.5


class Continual:
    def __init__(self, launch_file: Path, prepare: bool = True) -> None:
        cfg = load_launch(launch_file, check_ports=False)
        self.cfg, self.c = cfg, cfg.continual
        if cfg.node.log_dir is None:
            raise ConfigError("continual mode needs node.log_dir: it retrains from the log")
        self.log_dir = Path(cfg.node.log_dir)
        self.out = Path(self.c.out_dir)
        self.init: Path | None = Path(self.c.init) if self.c.init else None
        if self.init is not None:  # every round would fail on it: say so once, now
            load_config(self.init / "config.yaml")  # bounded, torch-free (the launch waits)
        if prepare:
            self.out.mkdir(parents=True, exist_ok=True)
        self.live_path = Path(cfg.node.model)
        self._stop = False

    def request_stop(self) -> None:
        self._stop = True

    def _say(self, line: str) -> None:
        print(f"continual: {line}", file=sys.stderr, flush=True)

    def _committed(self) -> int:
        return int(request(self.cfg.node.admin, "status", 2.0)["status"]["transitions_logged"])

    def run(self) -> None:
        rounds = 0
        last = 0
        stamp = time.strftime("%Y%m%dT%H%M%S")
        while not self._stop and not (self.c.max_rounds and rounds >= self.c.max_rounds):
            try:
                committed = self._committed()
            except AdminError:
                committed = last  # the node is starting or stopping; look again later
            if committed - last < self.c.every_transitions:
                time.sleep(POLL_S)
                continue
            rounds += 1
            last = committed
            run_dir = self.out / f"{stamp}-round{rounds}"
            try:
                self._round(rounds, committed, run_dir)
            except (ConfigError, ValueError, OSError) as e:  # one bad round is not the end
                self._record(rounds, committed, run_dir, time.monotonic(), False, f"failed: {e}")

    def _round(self, n: int, committed: int, run_dir: Path) -> None:
        from models.policy import OnnxPolicy, pixel_spec_dict
        from sim_bridge.pixels import make_env_for
        from training.evaluation import evaluate
        from training.retrain import retrain

        t0 = time.monotonic()
        self._say(f"round {n}: retraining on {committed} logged transitions")
        result = retrain(
            [self.log_dir],
            run_dir,
            init=self.init,
            updates=self.c.updates,
            eval_episodes=0,
            log=lambda line: None,
        )
        candidate = run_dir / "actor.onnx"
        if not candidate.is_file():  # the export's checks refused it: nothing to evaluate
            self._record(n, committed, run_dir, t0, deploy=False,
                         reason=f"no candidate: {result.get('export_error', 'export failed')}")  # fmt: skip
            return
        live_policy, cand_policy = OnnxPolicy(self.live_path), OnnxPolicy(candidate)
        env_id = self.cfg.bridges[0].env if self.cfg.bridges else result["env"]
        # a pixel pair is evaluated through the same rendering as its bridge sees
        env = make_env_for(env_id, pixel_spec_dict(live_policy.metadata))
        seed = self.c.eval_seed
        cand = evaluate(cand_policy, env, self.c.eval_episodes, seed)
        live = evaluate(live_policy, env, self.c.eval_episodes, seed)
        env.close()
        deploy = cand.mean >= live.mean - self.c.margin
        decision: dict[str, Any] = {
            "round": n,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "transitions": committed,
            "run_dir": str(run_dir),
            "candidate_model_id": cand_policy.model_id,
            "live_model_id": live_policy.model_id,
            "candidate_return": cand.mean,
            "live_return": live.mean,
            "eval_episodes": self.c.eval_episodes,
            "eval_seed": seed,
            "margin": self.c.margin,
            "deploy": deploy,
            "reason": (
                f"candidate {cand.mean:.1f} >= live {live.mean:.1f} - margin {self.c.margin:g}"
                if deploy
                else f"candidate {cand.mean:.1f} < live {live.mean:.1f} - margin {self.c.margin:g}"
            ),
            "retrain": {k: result.get(k) for k in ("updates", "transitions", "init")},
        }
        if deploy:
            try:
                reply = request(self.cfg.node.admin, "deploy", 60.0, path=str(candidate.resolve()))
                decision["deployed"] = reply["deploy"]
                self.live_path, self.init = candidate, run_dir
            except AdminError as e:
                decision["deploy"] = False
                decision["reason"] = f"the node refused it: {e}"
        self._write(decision, t0)

    def _record(
        self, n: int, committed: int, run_dir: Path, t0: float, deploy: bool, reason: str
    ) -> None:
        decision = {"round": n, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "transitions": committed, "run_dir": str(run_dir), "deploy": deploy,
                    "reason": reason}  # fmt: skip
        self._write(decision, t0)

    def _write(self, decision: dict[str, Any], t0: float) -> None:
        decision["seconds"] = round(time.monotonic() - t0, 1)
        append_decision(self.out, decision)
        self._say(
            f"round {decision['round']}: "
            f"{'deployed' if decision['deploy'] else 'kept the live actor'} ({decision['reason']})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.continual", description=__doc__)
    parser.add_argument("launch_file", type=Path)
    parser.add_argument(
        "--check", action="store_true", help="only check the launch file and the init run's config"
    )
    args = parser.parse_args(argv)
    if args.check:
        try:
            Continual(args.launch_file, prepare=False)
        except ConfigError as e:
            print(f"continual: error: {e}", file=sys.stderr)
            return 1
        return 0
    # Training is the batch job here: the node and the bridges must win the CPU when they wake.
    os.nice(10)
    try:
        worker = Continual(args.launch_file)
    except ConfigError as e:
        print(f"continual: error: {e}", file=sys.stderr)
        return 1

    def stop(*_: object) -> None:  # between rounds: stop at once; inside one: abandon it
        worker.request_stop()
        raise SystemExit(0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
