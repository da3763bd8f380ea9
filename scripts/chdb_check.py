"""Runs what the sink sends on a current ClickHouse engine (chdb).

Reads DIR/manifest.json, written by sink-clickhouse/tests/chdb.rs:
  ddl:       statements to run in order ("run": false: only parsed, for
             cluster DDL, which needs servers chdb does not have);
  queries:   lookups to run on the tables the DDL created;
  rowbinary: files of RowBinary rows with their structure and the values
             (SQL literals) they must decode to;
  inserts:   RowBinary files to insert into a created table, as the sink's
             INSERT … FORMAT RowBinary does.
Prints one line per check and a summary; exits 1 on any failure.
"""

import json
import os
import sys

import chdb
from chdb import session


def quote(text):
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def main(folder):
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    db = session.Session(os.path.join(folder, "chdb-data"))
    version = db.query("SELECT version()", "TSV").bytes().decode().strip()
    print(f"chdb {chdb.__version__}, ClickHouse {version}")
    failures = []
    counts = {"ddl": 0, "parsed": 0, "queries": 0, "rowbinary": 0, "rows": 0, "inserts": 0}

    def attempt(kind, name, sql, fmt="TSV"):
        try:
            return db.query(sql, fmt).bytes().decode()
        except Exception as err:  # chdb raises its server's exception text
            failures.append(f"{kind} {name}: {str(err).splitlines()[0][:400]}\n    {sql[:400]}")
            return None

    for stmt in manifest["ddl"]:
        if stmt["run"]:
            if attempt("ddl", stmt["name"], stmt["sql"]) is not None:
                counts["ddl"] += 1
        elif attempt("ddl (parse)", stmt["name"], "EXPLAIN AST " + stmt["sql"]) is not None:
            counts["parsed"] += 1

    for insert in manifest.get("inserts", []):
        path = os.path.join(folder, insert["file"])
        sql = (f"INSERT INTO {insert['table']} ({insert['columns']}) "
               f"SELECT * FROM file({quote(path)}, 'RowBinary', {quote(insert['structure'])})")
        if attempt("insert", insert["name"], sql) is not None:
            got = attempt("insert", insert["name"], f"SELECT count() FROM {insert['table']}").strip()
            if got != str(insert["rows"]):
                failures.append(f"insert {insert['name']}: {got} rows in the table, expected {insert['rows']}")
            else:
                counts["inserts"] += 1

    # The sink's insert_deduplication_token: the same rows again are dropped
    # by the server, other rows are not.
    for dedup in manifest.get("dedup", []):
        if attempt("dedup", dedup["name"], dedup["ddl"]) is None:
            continue
        path = os.path.join(folder, dedup["file"])
        for token in dedup["tokens"]:
            attempt("dedup", dedup["name"],
                    f"INSERT INTO {dedup['table']} SETTINGS insert_deduplication_token = {quote(token)} "
                    f"SELECT * FROM file({quote(path)}, 'RowBinary', {quote(dedup['structure'])})")
        got = attempt("dedup", dedup["name"], f"SELECT count() FROM {dedup['table']}")
        if got is not None and got.strip() != str(dedup["rows"]):
            failures.append(f"dedup {dedup['name']}: {got.strip()} rows, expected {dedup['rows']}")
        elif got is not None:
            counts["dedup"] = counts.get("dedup", 0) + 1

    for query in manifest["queries"]:
        if attempt("query", query["name"], query["sql"]) is not None:
            counts["queries"] += 1

    for batch in manifest["rowbinary"]:
        path = os.path.join(folder, batch["file"])
        structure = quote(batch["structure"])
        got = attempt("rowbinary", batch["name"], f"SELECT * FROM file({quote(path)}, 'RowBinary', {structure})")
        want = attempt("rowbinary", batch["name"] + " (expected)",
                       f"SELECT * FROM values({structure}, {batch['values']})")
        if got is None or want is None:
            continue
        if got != want:
            failures.append(f"rowbinary {batch['name']}: decoded\n{got}  expected\n{want}")
        else:
            counts["rowbinary"] += 1
            counts["rows"] += got.count("\n")

    print("checked: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    for failure in failures:
        print("FAILED " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
