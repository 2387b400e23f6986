#!/usr/bin/env python3
"""psycopg 3 through handoff in transaction mode: the prepared-statement cases that ended
in `26000 prepared statement ... does not exist` (docs/compatibility.md).

    psycopg-check.py PORT    (PGHOST defaults to 127.0.0.1, user and database postgres)

Exits non-zero, naming the case, at the first failure.
"""
import sys

import psycopg

PORT = int(sys.argv[1])
DSN = f"host=127.0.0.1 port={PORT} user=postgres dbname=postgres"


def connect():
    # Prepare from the first execution, as psycopg does after 5 by default.
    return psycopg.connect(DSN, autocommit=True, prepare_threshold=0)


def check(name, got, want):
    if got != want:
        sys.exit(f"psycopg-check: {name}: got {got!r}, want {want!r}")
    print(f"ok: {name}")


a, b = connect(), connect()
a.execute("DROP TABLE IF EXISTS pc_t")
a.execute("CREATE TABLE pc_t (x int)")
a.execute("INSERT INTO pc_t VALUES (1)")

# Prepared statements, then DROP/ALTER (psycopg answers with DEALLOCATE ALL), then the same
# statements again on both connections.
for _ in range(3):
    check("prepared select", a.execute("SELECT x FROM pc_t WHERE x = %s", (1,)).fetchone(), (1,))
    check("prepared select (other client)", b.execute("SELECT x FROM pc_t WHERE x = %s", (1,)).fetchone(), (1,))
a.execute("DROP TABLE IF EXISTS pc_nothing")
check("after DEALLOCATE ALL", a.execute("SELECT x FROM pc_t WHERE x = %s", (1,)).fetchone(), (1,))
check("other client after DEALLOCATE ALL", b.execute("SELECT x FROM pc_t WHERE x = %s", (1,)).fetchone(), (1,))

# A statement whose result changes type.
check("before ALTER", a.execute("SELECT * FROM pc_t WHERE x = %s", (1,)).fetchone(), (1,))
a.execute("ALTER TABLE pc_t ADD COLUMN y text DEFAULT 'y'")
check("after ALTER", a.execute("SELECT * FROM pc_t WHERE x = %s", (1,)).fetchone(), (1, "y"))
check("other client after ALTER", b.execute("SELECT * FROM pc_t WHERE x = %s", (1,)).fetchone(), (1, "y"))

# A type changed under a prepared statement.
a.execute("DROP TYPE IF EXISTS pc_mood CASCADE")
a.execute("CREATE TYPE pc_mood AS ENUM ('ok', 'sad')")
check("enum", a.execute("SELECT %s::text::pc_mood::text", ("ok",)).fetchone(), ("ok",))
a.execute("DROP TYPE pc_mood")
a.execute("CREATE TYPE pc_mood AS ENUM ('ok', 'sad')")
check("enum re-created", a.execute("SELECT %s::text::pc_mood::text", ("ok",)).fetchone(), ("ok",))

# SQL-level PREPARE/EXECUTE/DEALLOCATE (psycopg sends a query without parameters as a
# simple query until it prepares it itself, after 5 executions by default).
s = psycopg.connect(DSN, autocommit=True)
s.execute("PREPARE pc_named AS SELECT 41 + 1")
check("SQL PREPARE/EXECUTE", s.execute("EXECUTE pc_named").fetchone(), (42,))
with connect() as c:
    # Another client holds a server connection in a transaction: the next one runs on
    # another connection.
    c.execute("BEGIN")
    c.execute("SELECT 1")
    check("EXECUTE in a later transaction", s.execute("EXECUTE pc_named").fetchone(), (42,))
    c.execute("COMMIT")
s.execute("DEALLOCATE pc_named")
try:
    s.execute("EXECUTE pc_named")
    sys.exit("psycopg-check: EXECUTE after DEALLOCATE succeeded")
except psycopg.errors.InvalidSqlStatementName:
    print("ok: DEALLOCATE")
s.close()
a.execute("DISCARD ALL")
check("after DISCARD ALL", a.execute("SELECT x FROM pc_t WHERE x = %s", (1,)).fetchone(), (1,))
a.execute("DISCARD PLANS")
check("after DISCARD PLANS", a.execute("SELECT x FROM pc_t WHERE x = %s", (1,)).fetchone(), (1,))

# ROLLBACK (psycopg deallocates after it too) in a transaction block.
with a.transaction():
    check("in a transaction", a.execute("SELECT x FROM pc_t WHERE x = %s", (1,)).fetchone(), (1,))
try:
    with a.transaction():
        a.execute("SELECT 1/0")
except psycopg.errors.DivisionByZero:
    pass
check("after ROLLBACK", a.execute("SELECT x FROM pc_t WHERE x = %s", (1,)).fetchone(), (1,))

a.execute("DROP TABLE pc_t")
a.close()
b.close()
print("psycopg-check: all cases passed")
