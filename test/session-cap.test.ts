// One secret cannot hold the receiver's connections: a restore token (or a host's
// credential) that opens session after session gets MAX_SESSIONS_PER_SECRET of them,
// then 503, and other hosts still get in. Before the cap, one token could take all
// 256 and every agent's sync failed E_UNREACHABLE (503) until they were closed.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { SESSION_PATH } from '../shared/protocol.js';
import { MAX_SESSIONS_PER_SECRET } from '../receiver/server.js';
import { Deployment } from './harness.js';
import { writeMixedImage } from './fixtures.js';
import { RawWs } from './raw-ws.js';

/** receiver/server.ts MAX_CONNECTIONS: what one token could take before. */
const MAX_CONNECTIONS = 256;

describe('sessions per secret', () => {
  let d: Deployment;
  let image: string;
  const held: RawWs[] = [];

  before(async () => {
    d = await Deployment.start();
    await d.enroll('web1');
    image = join(d.root, 'web1.img');
    await writeMixedImage(image, 1024 * 1024, 3);
  });
  after(async () => {
    for (const ws of held) ws.destroy();
    await d?.close();
  });

  it(`one restore token gets ${MAX_SESSIONS_PER_SECRET} sessions, then 503; an agent still syncs`, { timeout: 120_000 }, async () => {
    const refusals: string[] = [];
    for (let i = 0; i < MAX_CONNECTIONS; i++) {
      const r = await RawWs.upgrade(d.receiver.url, d.receiver.fingerprint, { path: SESSION_PATH, headers: [`authorization: Bearer ${d.restoreToken}`, 'tidemark-protocol: 1'] });
      if (r.ws) held.push(r.ws);
      else refusals.push(`${r.status} ${r.body.trim()}`);
    }
    assert.equal(held.length, MAX_SESSIONS_PER_SECRET, `sessions opened with one token (refusals: ${refusals[0]})`);
    assert.match(refusals[0]!, /^503 this credential already has \d+ open sessions/);
    const point = await d.syncOnce('web1', [image]); // throws if the agent cannot get in
    assert.ok(point.pointId > 0);

    // Closing sessions gives their room back.
    for (const ws of held.splice(0, 4)) ws.destroy();
    await new Promise((r) => setTimeout(r, 200));
    const again = await RawWs.upgrade(d.receiver.url, d.receiver.fingerprint, { path: SESSION_PATH, headers: [`authorization: Bearer ${d.restoreToken}`, 'tidemark-protocol: 1'] });
    assert.equal(again.status, 101, again.body);
    held.push(again.ws!);
  });
});
