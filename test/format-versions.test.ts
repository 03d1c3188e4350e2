// Stored formats carry a version, and a program refuses a version it does not
// know with a one-line error naming the fix, instead of misreading the data
// (SPEC §2): the receiver's data directory marker and the agent's state.db.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { AgentState } from '../agent/state.js';
import { runCli, runJson, tempDir } from './harness.js';

describe('format versions', () => {
  const root = tempDir();
  after(() => rmSync(root, { recursive: true, force: true }));

  it('a receiver data directory of an unknown version or format is refused', async () => {
    const data = join(root, 'receiver');
    await runJson('receiver', ['init', '--data', data, '--json']);
    assert.equal((await runCli('receiver', ['status', '--data', data, '--json'])).code, 0);
    const markerPath = join(data, 'receiver.json');
    const marker = JSON.parse(readFileSync(markerPath, 'utf8'));

    assert.equal(marker.version, 2);
    writeFileSync(markerPath, JSON.stringify({ ...marker, version: 3 }));
    const newer = await runCli('receiver', ['status', '--data', data]);
    assert.equal(newer.code, 11, newer.stderr);
    assert.match(newer.stderr, /data directory version 3; this receiver reads versions 1 and 2: use the tidemark release that wrote it/);
    assert.equal(newer.stderr.trim().split('\n').length, 1);

    writeFileSync(markerPath, JSON.stringify({ ...marker, format: 'something-else' }));
    const foreign = await runCli('receiver', ['serve', '--data', data, '--listen', '127.0.0.1:0']);
    assert.equal(foreign.code, 2, foreign.stderr);
    assert.match(foreign.stderr, /does not mark a receiver data directory/);
  });

  it('an agent state directory of an unknown schema version is refused', async () => {
    const dir = join(root, 'agent');
    AgentState.open(dir, { mustBeEnrolled: false }).close();
    const db = new Database(join(dir, 'state.db'));
    assert.equal(db.prepare(`SELECT value FROM config WHERE key = 'schemaVersion'`).pluck().get(), '1', 'a new state directory records its version');
    db.prepare(`UPDATE config SET value = '2' WHERE key = 'schemaVersion'`).run();
    db.close();
    const run = await runCli('agent', ['status', '--state', dir]);
    assert.equal(run.code, 13, run.stderr);
    assert.match(run.stderr, /state\.db has schema version 2; this agent reads version 1/);
  });
});
