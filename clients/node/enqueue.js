// Enqueue jobs into the worker's table the way a Node.js web app would: one
// plain INSERT per job (each its own transaction), better-sqlite3 with its
// default options (busy timeout 5 s), only `type` and `data` given.
//
//   node enqueue.js DB COUNT TYPE DATA_JSON [PAUSE_MS]
//
// PAUSE_MS (default 0) spaces the inserts out, as requests arriving over time.
//
// Prints one JSON object: the new ids, how each invalid insert was refused,
// and the versions and busy timeout in use.
"use strict";

const Database = require("better-sqlite3");

const [dbPath, countArg, type, dataJson, pauseArg] = process.argv.slice(2);
const count = Number(countArg);
const data = JSON.parse(dataJson || "{}");
const pauseMs = Number(pauseArg || 0);
const pause = new Int32Array(new SharedArrayBuffer(4));

const db = new Database(dbPath);
const insert = db.prepare("INSERT INTO worker_jobs (type, data) VALUES (?, ?)");
const started = Date.now();
const ids = [];
for (let n = 0; n < count; n++) {
  const { lastInsertRowid } = insert.run(type, JSON.stringify({ ...data, n }));
  ids.push(Number(lastInsertRowid));
  if (pauseMs > 0) Atomics.wait(pause, 0, 0, pauseMs); // a synchronous sleep
}
const insertMs = Date.now() - started;

// The table itself must refuse data that is not a JSON object, whoever writes it.
const refused = {};
for (const bad of ["{not json", "[1, 2]"]) {
  try {
    insert.run(type, bad);
    refused[bad] = null;
  } catch (error) {
    refused[bad] = error.code;
  }
}

console.log(
  JSON.stringify({
    ids,
    refused,
    insertMs,
    busyTimeout: db.pragma("busy_timeout", { simple: true }),
    journalMode: db.pragma("journal_mode", { simple: true }),
    betterSqlite3: require("better-sqlite3/package.json").version,
    sqlite: db.prepare("SELECT sqlite_version() AS v").get().v,
  }),
);
db.close();
