"""Writes one section of docs/benchmarks.md, between its BEGIN and END markers, in place
(the rest of the file is kept), atomically. Used by scripts/bench for every section."""

import os


def write_section(doc_path, begin, end, lines):
    section = "\n".join(lines) + "\n"
    try:
        with open(doc_path) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = "# Benchmarks\n\nMeasured numbers, each section written by the script it names.\n"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        doc = head + section + ("\n" + tail if tail else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + section
    tmp = doc_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, doc_path)
