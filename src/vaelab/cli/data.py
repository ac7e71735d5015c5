"""``vaelab data list | fetch NAME | verify [NAME]``: datasets on disk."""

from __future__ import annotations

import argparse

from vaelab.cli._common import add_data_dir, format_table, human_size


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="list, fetch or verify datasets")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="every dataset: size, present?, verified?")
    ls.add_argument("--no-verify", action="store_true", help="skip checksums (faster)")
    add_data_dir(ls)
    ls.set_defaults(func=run_list)
    fetch = sub.add_parser("fetch", help="download a dataset's missing files and verify them")
    fetch.add_argument("name", metavar="NAME")
    add_data_dir(fetch)
    fetch.set_defaults(func=run_fetch)
    verify = sub.add_parser("verify", help="check a dataset's files against their checksums")
    verify.add_argument(
        "name",
        metavar="NAME",
        nargs="?",
        default=None,
        help="dataset (default: every dataset that is present)",
    )
    add_data_dir(verify)
    verify.set_defaults(func=run_verify)
    add_data_dir(p)


def _yes(value) -> str:
    return {True: "yes", False: "NO", None: "-"}[value]


def run_list(args: argparse.Namespace) -> int:
    from vaelab.data import DATASETS, list_datasets, resolve_data_dir

    print(f"data dir: {resolve_data_dir(args.data_dir)}")
    rows = [
        [
            r["dataset"],
            ", ".join(r["names"]),
            r["files"],
            human_size(r["size"] or None),
            _yes(r["present"]),
            _yes(r["verified"]),
            DATASETS.describe(r["dataset"]),
        ]
        for r in list_datasets(args.data_dir, verify=not args.no_verify)
    ]
    headers = ["dataset", "names", "files", "size", "present", "verified", "description"]
    print(format_table(rows, headers))
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from vaelab.data import fetch_dataset

    paths = fetch_dataset(args.name, args.data_dir)
    for path in paths:
        print(path)
    print(
        f"{args.name}: {len(paths)} file(s) present and verified"
        if paths
        else f"{args.name}: nothing to fetch (built in)"
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from vaelab.data import DATASETS, FILES, dataset_status, verify_dataset

    names = (
        [args.name]
        if args.name
        else [
            n
            for n in DATASETS.names()
            if n in FILES and all(f["present"] for f in dataset_status(n, args.data_dir))
        ]
    )
    rows, ok = [], True
    for name in names:
        for f in verify_dataset(name, args.data_dir):
            good = f["present"] and f["verified"] is not False
            ok &= good
            rows.append(
                [
                    name,
                    f["file"],
                    human_size(f["size"]),
                    _yes(f["present"]),
                    _yes(f["verified"]),
                    f["detail"] or f["path"],
                ]
            )
    print(format_table(rows, ["dataset", "file", "size", "present", "verified", "detail"]))
    return 0 if ok else 1
