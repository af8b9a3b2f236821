"""``ddpg status``: ask a running node how it is doing (``--watch`` redraws a live view).

The node's admin address comes from ``--node ADDR`` or, without it, ``./launch.yaml``. Status
needs no credentials; ``--shutdown`` carries the node's admin token, found on its own when run
as the node's user on its machine (``--token-file`` otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from control_node.admin import AdminError, add_address_arguments, admin_address, request
from control_node.realtime import describe

EXAMPLES = """\
examples:
  ddpg status                       # the node of ./launch.yaml
  ddpg status --node tcp://127.0.0.1:5556 --json
  ddpg status --watch               # live view until Ctrl-C
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    add_address_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the whole status as JSON")
    parser.add_argument("--watch", action="store_true", help="redraw a live view until Ctrl-C")
    parser.add_argument(
        "--interval",
        type=float,
        default=0.5,
        metavar="S",
        help="--watch redraw period (default: 0.5)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="how long to wait for an answer (default: 2)",
    )
    parser.add_argument("--shutdown", action="store_true", help="ask the node to stop cleanly")


def render(s: dict[str, Any]) -> str:
    """A terminal view of a status: rate, misses, latency, bridges, episodes and returns."""
    lat, age = s["latency_us"], s["obs_age_us"]
    lines = [
        f"node pid {s['pid']}  {s['state']}  model {s['model_id']} ({s['env_id']})  "
        f"up {s['uptime_s']:.1f} s",
        f"rate   {s['achieved_rate_hz']:.1f} / {s['rate_hz']:g} Hz   ticks {s['ticks']}   "
        f"misses {s['deadline_misses']} ({100 * s['miss_ratio']:.3f}%)   fresh "
        f"{100 * s['fresh_ratio']:.1f}%",
        f"latency p50 {lat['p50']:.0f} us  p99 {lat['p99']:.0f} us  max {lat['max']:.0f} us   "
        f"obs age p50 {age['p50']:.0f} us  p99 {age['p99']:.0f} us",
        f"safety rejected {s['rejected_messages']}  safe actions {s['safe_actions']}  "
        f"stale events {s['stale_events']}   logged {s['transitions_logged']}",
        f"episodes {s['episodes']}  mean return "
        + ("-" if s["mean_return"] is None else f"{s['mean_return']:.1f}"),
    ]
    if s.get("realtime"):
        lines.append(f"real-time {describe(s['realtime'])}")
    if bs := s.get("bridges_summary"):
        lines.append(
            f"bridges live {bs['live']}  stale {bs['stale']}  gone {bs['gone']}  forgotten "
            f"{bs['forgotten']}  refused (full) {bs['refused_full']}   dropped over rate "
            f"{s.get('dropped_over_rate', 0)}"
        )
    for model, r in s["returns_by_model"].items():
        lines.append(
            f"  model {model}: {r['episodes']} episodes, return {r['mean']:.1f} ± {r['std']:.1f}"
        )
    lines.append(
        f"{'bridge':<12}{'mode':<10}{'state':<7}{'episode':>8}{'last return':>13}"
        f"{'obs':>9}{'fresh':>8}{'silent ms':>11}"
    )
    for b in s["bridges"]:
        last = "-" if b["last_return"] is None else f"{b['last_return']:.1f}"
        fresh = f"{100 * b['fresh'] / b['observations']:.1f}%" if b["observations"] else "-"
        lines.append(
            f"{b['id']:<12}{b['mode']:<10}{b['state']:<7}{b['episode']:>8}{last:>13}"
            f"{b['observations']:>9}{fresh:>8}{b['silent_ms']:>11.1f}"
        )
    if s["last_rejections"]:
        lines.append("last rejections: " + " | ".join(s["last_rejections"][-3:]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        address = admin_address(args.node, args.launch)
        if args.shutdown:
            reply = request(address, "shutdown", args.timeout, args.token_file)
            print(f"ddpg status: node pid {reply['status']['pid']} is stopping")
            return 0
        if not args.watch:
            status = request(address, "status", args.timeout)["status"]
            print(json.dumps(status, indent=2) if args.json else render(status))
            return 0
        while True:
            status = request(address, "status", args.timeout)["status"]
            sys.stdout.write("\x1b[H\x1b[2J" + render(status) + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except AdminError as e:
        print(f"ddpg status: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
