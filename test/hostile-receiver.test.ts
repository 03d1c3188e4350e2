// The restore side facing a faulty or hostile receiver (SPEC §10: the receiver is
// not trusted with the data): a relay that holds the receiver's TLS key passes a
// real receiver's replies on, rewriting some (test/tampering-relay.ts). A point map
// out of order, naming a block twice, with ids missing, or paged so that it never
// advances, and a point listing with an impossible block size or paging that repeats
// itself, are protocol errors (exit 8, one line) for every restore mode: never a
// wrong image with exit 0 (failback wrote zeros over data it had compared as equal),
// an internal error, or a loop that requests the same page forever.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Deployment, collectGuarded, spawnCli, type CliResult } from './harness.js';
import { writeMixedImage } from './fixtures.js';
import { TamperingRelay, type Tamper } from './tampering-relay.js';

const MiB = 1024 * 1024;
type Mode = 'disk' | 'failback' | 'export' | 'verify';
const MODES: Mode[] = ['disk', 'failback', 'export', 'verify'];

describe('restore from a receiver that sends bad maps and listings', () => {
  let d: Deployment;
  let relay: TamperingRelay;
  let image: string;
  let run = 0;

  before(async () => {
    d = await Deployment.start();
    relay = await TamperingRelay.start(d.receiver);
    await d.enroll('web1');
    image = join(d.root, 'web1.img');
    await writeMixedImage(image, 4 * MiB, 7);
    await d.syncOnce('web1', [image]);
  });
  after(async () => {
    await relay?.close();
    await d?.close();
  });

  /** One restore command through the relay; a failback target starts as zeros, so every data block differs. */
  async function restoreVia(mode: Mode): Promise<CliResult & { to: string }> {
    const to = join(d.root, `out-${run++}`);
    const args = ['--receiver', relay.url, '--fingerprint', d.receiver.fingerprint, '--key-file', d.keyFile, '--host', 'web1'];
    if (mode === 'failback') writeFileSync(to, Buffer.alloc(4 * MiB));
    const command = {
      disk: ['disk', ...args, '--disk', image, '--point', '1', '--to', to],
      failback: ['disk', ...args, '--disk', image, '--point', '1', '--to', to, '--failback'],
      export: ['export', ...args, '--point', '1', '--to', to],
      verify: ['verify', ...args, '--read-data'],
    }[mode];
    // A restore that pages forever is killed (signal SIGKILL in the result).
    return { ...await collectGuarded(spawnCli('restore', command, { TIDEMARK_TOKEN: d.restoreToken }), 30_000), to };
  }

  async function expectProtocolError(tamper: Tamper, modes: Mode[] = MODES): Promise<void> {
    relay.tamper = tamper;
    for (const mode of modes) {
      const r = await restoreVia(mode);
      assert.equal(r.signal, null, `${mode}: still running after 30 s (killed)`);
      assert.equal(r.code, 8, `${mode}: exit ${r.code}, stderr: ${r.stderr}`);
      assert.match(r.stderr, /receiver .*(faulty|malformed)/, mode);
      assert.equal(r.stderr.trim().split('\n').length, 1, `${mode}: one line: ${r.stderr}`);
      if (mode === 'failback') assert.ok(readFileSync(r.to).equals(Buffer.alloc(4 * MiB)), 'failback wrote nothing');
      else assert.ok(!existsSync(r.to) && !existsSync(`${r.to}.partial`), `${mode}: no file left at ${r.to}`);
    }
  }

  const onMap = (change: (reply: Record<string, any>, request: Record<string, any>) => void): Tamper => (type, reply, request) => {
    if (type === 'point.map') change(reply, request);
    return reply;
  };
  const onList = (change: (reply: Record<string, any>, request: Record<string, any>) => void): Tamper => (type, reply, request) => {
    if (type === 'points.list') change(reply, request);
    return reply;
  };

  it('the relay alone changes nothing: every mode succeeds through it', async () => {
    relay.tamper = (_type, reply) => reply;
    for (const mode of MODES) {
      const r = await restoreVia(mode);
      assert.equal(r.code, 0, `${mode}: ${r.stderr}`);
      if (mode === 'disk' || mode === 'failback') assert.ok(readFileSync(r.to).equals(readFileSync(image)), `${mode}: the image is the disk`);
    }
  });

  it('a map out of order', () => expectProtocolError(onMap((reply) => {
    reply.blocks.reverse();
    reply.ids.reverse();
  })));

  it('a map naming a block twice, with another chunk', () => expectProtocolError(onMap((reply) => {
    reply.blocks.splice(2, 0, reply.blocks[1]);
    reply.ids.splice(2, 0, reply.ids[5]);
  })));

  it('a map with fewer ids than blocks', () => expectProtocolError(onMap((reply) => void reply.ids.pop())));

  it('a map page that does not advance', () => expectProtocolError(onMap((reply, request) => {
    reply.blocks = [];
    reply.ids = [];
    reply.next = request.fromBlock;
  })));

  it('a map page that goes back before the block asked for', async () => {
    let first: Record<string, any> | null = null;
    await expectProtocolError(onMap((reply, request) => {
      if (request.fromBlock === 0) {
        // Cut the first page short, as a receiver may, and remember it.
        reply.next = reply.blocks[10];
        reply.blocks = reply.blocks.slice(0, 10);
        reply.ids = reply.ids.slice(0, 10);
        first = { ...reply };
      } else Object.assign(reply, { blocks: first!.blocks, ids: first!.ids, next: first!.next });
    }));
  });

  it('a listing with a block size no disk can have', async () => {
    for (const blockBytes of [0, 3000, 2 ** 21]) {
      await expectProtocolError(onList((reply) => reply.points.forEach((p: any) => p.disks.forEach((disk: any) => (disk.blockBytes = blockBytes)))));
    }
  });

  it('a listing whose paging does not advance, or lists its points again', async () => {
    await expectProtocolError(onList((reply, request) => (reply.next = request.afterId ?? 0)));
    let first: Record<string, any> | null = null;
    await expectProtocolError(onList((reply, request) => {
      if (request.afterId === null) {
        reply.next = reply.points.at(-1).id;
        first = { points: reply.points, next: reply.next };
      } else Object.assign(reply, first);
    }));
  });

  it('after all that, restores through the relay are whole again', async () => {
    relay.tamper = (_type, reply) => reply;
    const r = await restoreVia('disk');
    assert.equal(r.code, 0, r.stderr);
    assert.ok(readFileSync(r.to).equals(readFileSync(image)));
  });
});
