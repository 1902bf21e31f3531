#!/usr/bin/env python3
"""Runs every ```sh block of README.md, as written, in order.

The blocks run as one shell session would: each in `bash -euo pipefail`
in the repository's root, with the variables the blocks before it
exported (so `export PATH=...` in one block holds for the next). A block
passes when it exits 0 and prints what its annotation expects.

An HTML comment right before a block (invisible on the rendered page)
gives what a person at the keyboard would: `stdin` is typed into the
block (with \\n and \\x01 escapes) — once its output shows `prompt`, if
given, as a person types at the prompt —, `expect` must appear in its output,
`timeout` is in seconds (default 900), `cleanup` lists files the block
leaves in the tree, removed afterwards:

    <!-- ci: stdin="echo HELLO-$((6*7))\\nexit\\n" prompt="/ # " expect="HELLO-42" -->

Usage: python3 .ci/readme.py [README.md]
"""

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

ANNOTATION = re.compile(r"<!--\s*ci:(.*?)-->", re.S)


def blocks(text):
    """(line number, annotation dict, code) for each ```sh block."""
    out = []
    lines = text.split("\n")
    i = 0
    pending = {}
    while i < len(lines):
        line = lines[i]
        m = ANNOTATION.search(line)
        if m:
            pending = dict(
                (k, v.encode().decode("unicode_escape"))
                for k, v in (
                    part.split("=", 1) for part in shlex.split(m.group(1))
                )
            )
        if line.strip() == "```sh":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            out.append((start, pending, "\n".join(lines[start:j])))
            pending = {}
            i = j
        elif line.strip() and not m:
            pending = {}
        i += 1
    return out


def run_block(root, env_file, number, annotation, code):
    timeout = int(annotation.get("timeout", "900"))
    script = (
        f'set -a; . "{env_file}"; set +a\n'
        + code
        + f'\nexport -p > "{env_file}.next"\n'
    )
    stdin = annotation.get("stdin")
    print(f"\n== README.md line {number}:\n{code}\n", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=root,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    prompt = annotation.get("prompt", "").encode()
    typed = False

    def type_input():
        proc.stdin.write(stdin.encode("latin-1"))
        proc.stdin.close()

    if stdin is not None and not prompt:
        type_input()
        typed = True
    seen = bytearray()
    # Output is passed on as it comes (the test command's summary lines
    # belong in CI's log) and kept for the `expect` check.
    os.set_blocking(proc.stdout.fileno(), False)
    while True:
        chunk = proc.stdout.read(65536)
        if chunk:
            seen += chunk
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            if stdin is not None and not typed and prompt in seen:
                type_input()
                typed = True
        elif proc.poll() is not None:
            break
        else:
            if time.monotonic() - started > timeout:
                proc.kill()
                proc.wait()
                return f"did not finish within {timeout} s"
            time.sleep(0.05)
    for name in annotation.get("cleanup", "").split():
        path = os.path.join(root, name)
        if os.path.isfile(path):
            os.remove(path)
    if proc.returncode != 0:
        return f"exited {proc.returncode}"
    expect = annotation.get("expect")
    if expect and expect.encode() not in seen:
        return f"printed no {expect!r}"
    os.replace(env_file + ".next", env_file)
    took = time.monotonic() - started
    print(f"== README.md line {number}: ok ({took:.0f} s)", flush=True)
    return None


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "README.md")
    with open(readme) as f:
        found = blocks(f.read())
    if not found:
        print("readme.py: README.md has no ```sh block", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        env_file = os.path.join(tmp, "env")
        open(env_file, "w").close()
        # The examples' managed VMs live in a store of their own, so a
        # user's VMs of the same names are neither in the way nor touched.
        os.environ["XDG_DATA_HOME"] = os.path.join(tmp, "data")
        for number, annotation, code in found:
            why = run_block(root, env_file, number, annotation, code)
            if why:
                print(f"readme.py: the block at README.md line {number} {why}", file=sys.stderr)
                return 1
    print(f"readme.py: all {len(found)} README blocks ran as written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
