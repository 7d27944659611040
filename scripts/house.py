#!/usr/bin/env python3
"""The house's figures (issue 25), measured from the source: the longest functions, module
import cycles, and the walk of `ctx` from `controller::reconcile::reconcile`.

    python3 scripts/house.py            # all three
    python3 scripts/house.py --limit 60 # also list every function longer than 60 lines

Heuristic, not a Rust parser: functions are found by `fn name` and their braces counted
outside strings, chars and comments; modules by file; an edge is a `use`/path naming a
sibling module. Good enough to keep the figures honest; exact for this code base's style.
"""
import argparse
import os
import re
import sys
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SRC = os.path.join(ROOT, "src")


def strip(text):
    """The text with comments, strings and char literals blanked (lengths kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i)); i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j])); i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = '"' + hashes
            j = text.find(end, i + 2 + len(hashes))
            j = n if j < 0 else j + len(end)
            out.append(re.sub(r"[^\n]", " ", text[i:j])); i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i:j + 1])); i = j + 1
        elif c == "'":
            m = re.match(r"'(\\.|\\u\{[0-9a-fA-F]+\}|[^\\'])'", text[i:i + 12])
            if m:
                out.append(" " * len(m.group(0))); i += len(m.group(0))
            else:
                out.append(c); i += 1
        else:
            out.append(c); i += 1
    return "".join(out)


def rust_files(base):
    for d, _, files in os.walk(base):
        for f in files:
            if f.endswith(".rs"):
                yield os.path.join(d, f)


FN = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)")


def functions(path):
    """(name, first line, line count, body text) of every fn with a body, tests excluded."""
    raw = open(path).read()
    text = strip(raw)
    test_at = len(text)
    m = re.search(r"#\[cfg\(test\)\]\s*mod\s+tests", raw)
    if m:
        test_at = m.start()
    found = []
    for m in FN.finditer(text):
        if m.start() >= test_at:
            break
        depth, j = 0, m.end()
        while j < len(text) and text[j] not in "{;":
            j += 1
        if j >= len(text) or text[j] == ";":
            continue
        start = j
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        first = text.count("\n", 0, m.start()) + 1
        last = text.count("\n", 0, j) + 1
        found.append((m.group(1), first, last - first + 1, text[start:j + 1]))
    return found


def lengths(limit):
    rows = []
    for path in rust_files(SRC):
        for name, line, count, _ in functions(path):
            rows.append((count, os.path.relpath(path, ROOT), line, name))
    rows.sort(reverse=True)
    controller = [r for r in rows if "/controller/" in r[1]]
    print("Longest functions (lines, tests excluded):")
    for count, path, line, name in rows[:8]:
        print(f"  {count:4}  {name}  {path}:{line}")
    print(f"  over 80 lines anywhere: {sum(r[0] > 80 for r in rows)}; "
          f"controller functions over 60: {sum(r[0] > 60 for r in controller)}")
    if limit:
        for count, path, line, name in rows:
            if count > limit:
                print(f"  > {limit}: {count:4}  {name}  {path}:{line}")


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3]
    parts = rel.split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return "::".join(parts) or "crate"


def cycles():
    """Strongly connected module groups among the sibling modules of each directory."""
    mods = {module_of(p): p for p in rust_files(SRC)}
    edges, upward = defaultdict(set), set()
    for mod, path in mods.items():
        text = strip(open(path).read())
        m = re.search(r"#\[cfg\(test\)\]\s*mod\s+tests", open(path).read())
        if m:
            text = text[:m.start()]
        parent = mod.rsplit("::", 1)[0] if "::" in mod else "crate"
        is_dir = path.endswith("mod.rs") or mod in ("lib", "main")
        # `super::x` from a file module is its parent's child x; from mod.rs, its grandparent's.
        sup = (mod.rsplit("::", 1)[0] if "::" in mod else "crate") if is_dir else parent
        for stmt in re.findall(r"\buse\s+[^;]+;|\b(?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+", text):
            for target in expand(stmt, sup):
                t = target
                while t and t not in mods:
                    t = t.rsplit("::", 1)[0] if "::" in t else ""
                if t and t != mod and not mod.startswith(t + "::"):
                    edges[mod].add(t)
                elif t and t != mod and t == parent and t != "crate" and not is_dir:
                    upward.add(mod)
    # Tarjan
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop(); on.discard(w); group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))
    for v in list(mods):
        if v not in index:
            visit(v)
    print(f"Module cycles: {len(out)}")
    for group in out:
        print("  " + " <-> ".join(group))
    up = sorted(m for m in upward if m.startswith("controller::"))
    print(f"controller modules importing from controller/mod.rs: {len(up)} {' '.join(up)}")
    return edges


def expand(stmt, sup):
    """Module paths named by a `use` statement or a path expression."""
    stmt = re.sub(r"\s+", "", stmt)
    stmt = re.sub(r"^(pub(\([a-z]+\))?)?use", "", stmt).rstrip(";")

    def rec(prefix, s):
        m = re.match(r"^([^{]*)\{(.*)\}$", s)
        if not m:
            yield prefix + s
            return
        head, inner = m.group(1), m.group(2)
        depth, cur, parts = 0, "", []
        for ch in inner:
            if ch == "," and depth == 0:
                parts.append(cur); cur = ""
                continue
            depth += ch == "{"; depth -= ch == "}"
            cur += ch
        parts.append(cur)
        for p in parts:
            if p:
                yield from rec(prefix + head, p)
    for path in rec("", stmt):
        path = re.sub(r"::(self|\*)$", "", path)
        path = re.sub(r"\bas\b.*$", "", path)
        if path.startswith("crate::"):
            yield path[len("crate::"):]
        elif path.startswith("super::"):
            rest = path[len("super::"):]
            while rest.startswith("super::"):
                sup = sup.rsplit("::", 1)[0] if "::" in sup else "crate"
                rest = rest[len("super::"):]
            yield (rest if sup == "crate" else sup + "::" + rest)


def walk():
    """Follows `ctx` from controller::reconcile::reconcile through every call that passes it
    on (as an argument, or as the receiver `ctx.f(..)`): a stop is a function reached, a
    return is the walk coming back to a room (file) it had left."""
    fns = defaultdict(dict)  # name -> {module: body}
    for path in rust_files(os.path.join(SRC, "controller")):
        for name, _, _, body in functions(path):
            fns[name].setdefault(module_of(path), body)
    call = re.compile(r"(?:\b([a-z_][a-z0-9_]*)::)?\b([a-z_][a-z0-9_]*)\s*(?:::<[^>]*>)?\s*\(")
    passes_ctx = re.compile(r"^\s*&?\s*(ctx|self\.ctx|self)(\.clone\(\))?\s*(,|$)")

    def args_of(body, at):
        depth, j = 1, at
        while j < len(body) and depth:
            depth += body[j] == "("; depth -= body[j] == ")"
            j += 1
        return body[at:j - 1]

    def callees(body, room):
        for m in call.finditer(body):
            qualifier, name = m.group(1), m.group(2)
            before = body[max(0, m.start() - 6):m.start()]
            receiver = re.search(r"\bctx\s*\.\s*$", before) is not None
            args = args_of(body, m.end())
            if not (receiver or any(passes_ctx.match(a) for a in args.split(","))):
                continue
            if name not in fns:
                continue
            homes = fns[name]
            target = None
            if qualifier and "controller::" + qualifier in homes:
                target = "controller::" + qualifier
            elif room in homes:
                target = room
            elif len(homes) == 1 or receiver:
                target = next(iter(homes))
            if target:
                yield name, target

    order, seen = [], set()

    def visit(name, room):
        seen.add((name, room))
        order.append((room, name))
        for callee, home in callees(fns[name][room], room):
            if (callee, home) not in seen:
                visit(callee, home)
                order.append((room, None))

    visit("reconcile", "controller::reconcile")
    current, left, returns = None, set(), 0
    for room, name in order:
        if room != current:
            if current is not None:
                left.add(current)
            if room in left:
                returns += 1
            current = room
    stops = [(r, n) for r, n in order if n]
    print(f"ctx walk from reconcile: {len(stops)} stops, {returns} returns to rooms already left")
    print("  " + " -> ".join(f"{r.split('::')[-1]}::{n}" for r, n in stops))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    lengths(args.limit)
    cycles()
    walk()
