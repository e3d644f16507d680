"""Run one command per node of a Ray cluster: ``neobert prepare``'s block of tasks, or a
torchrun launcher of ``neobert pretrain`` (docs/scale.md, "Stage 1 on a cluster").

    python scripts/ray_launch.py --nodes 8 --gpus-per-node 8 -- \\
        torchrun --nnodes={nodes} --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint={head}:29500 \\
        --rdzv-id=stage1 --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \\
        -m neobert pretrain configs/neobert-base.yaml data.source=/shared/refinedweb-bert
    python scripts/ray_launch.py --nodes 16 --cpus-per-node 64 -- \\
        neobert prepare configs/neobert-base.yaml data.source='/shared/raw/rw/*.parquet' \\
        prepare.output=/shared/refinedweb-bert data.num_proc=64 prepare.nodes={nodes} prepare.node_rank={rank}

A ``STRICT_SPREAD`` placement group reserves one bundle of ``--cpus-per-node`` CPUs and
``--gpus-per-node`` GPUs on each of ``--nodes`` distinct nodes; the command runs once in
each bundle, in this directory (a file system every node sees), with ``{rank}`` (0 ..
nodes-1), ``{nodes}`` and ``{head}`` (the host name of bundle 0's node, the rendezvous
endpoint: torchrun's c10d rendezvous hosts its store on the node whose own name it is given,
which an IP address does not always match) replaced. Exits with the largest exit status of the commands. Ray schedules;
the commands themselves resume (``train.resume=auto``, prepared shards), so after a lost
node the same launch continues the work.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def expand(command: list[str], rank: int, nodes: int, head: str) -> list[str]:
    """The command of node ``rank``: ``{rank}``, ``{nodes}`` and ``{head}`` replaced (no other
    brace is touched, so JSON or globs in the command pass through)."""
    return [a.replace("{rank}", str(rank)).replace("{nodes}", str(nodes)).replace("{head}", head) for a in command]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ray_launch.py", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --nodes N [--gpus-per-node G] [--cpus-per-node C] [--address A] -- COMMAND ...")
    parser.add_argument("--nodes", type=int, required=True, help="distinct nodes, one command each")
    parser.add_argument("--gpus-per-node", type=float, default=0, help="GPUs reserved per node (default 0)")
    parser.add_argument("--cpus-per-node", type=float, default=1, help="CPUs reserved per node (default 1)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command, with {rank}, {nodes}, {head}")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command: give it after --")
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(address=args.address)
    bundle = {"CPU": args.cpus_per_node, **({"GPU": args.gpus_per_node} if args.gpus_per_node else {})}
    group = placement_group([bundle] * args.nodes, strategy="STRICT_SPREAD")
    ray.get(group.ready())

    def on(index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)

    @ray.remote(num_cpus=0)
    def host_name() -> str:
        import socket

        return socket.gethostname()

    @ray.remote(max_retries=0)
    def run(command: list[str], cwd: str) -> int:
        return subprocess.run(command, cwd=cwd).returncode

    head = ray.get(host_name.options(scheduling_strategy=on(0)).remote())
    resources = dict(num_cpus=args.cpus_per_node, num_gpus=args.gpus_per_node)
    codes = ray.get([run.options(scheduling_strategy=on(r), **resources).remote(expand(args.command, r, args.nodes, head), os.getcwd())
                     for r in range(args.nodes)])
    for rank, code in enumerate(codes):
        print(f"node {rank}: exit {code}", file=sys.stderr)
    return max(codes)


if __name__ == "__main__":
    raise SystemExit(main())
