// A full catalog or disk becomes E_STORAGE (retryable) naming the receiver's full
// disk; the pack store survives it (nothing half-written is referenced) and works
// again once there is room; the failure is logged once, not once per chunk.
// Real SQLITE_FULL without root: the catalog's max_page_count caps its size.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { TidemarkError, asTidemarkError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import { Catalog } from '../../receiver/catalog.js';
import { LocalPackStore } from '../../receiver/pack-store.js';
import { StorageAlarm } from '../../receiver/storage-alarm.js';
import { tempDir } from '../harness.js';

const VAULT = 'ab'.repeat(16);

function envelope(bytes: number): Buffer {
  const e = randomBytes(bytes);
  e.write('TMCH', 0);
  e[4] = 1;
  return e;
}

function recordingLogger(): { log: Logger; lines: Array<{ level: string; obj: Record<string, unknown>; msg: string }> } {
  const lines: Array<{ level: string; obj: Record<string, unknown>; msg: string }> = [];
  const at = (level: string) => (obj: Record<string, unknown>, msg: string) => void lines.push({ level, obj, msg });
  return { log: { error: at('error'), warn: at('warn'), info: at('info'), debug: at('debug') } as unknown as Logger, lines };
}

describe('storage errors', () => {
  it('maps ENOSPC, EDQUOT, SQLITE_FULL and SQLITE_IOERR_* to retryable E_STORAGE', () => {
    for (const code of ['ENOSPC', 'EDQUOT', 'SQLITE_FULL', 'SQLITE_IOERR_WRITE', 'SQLITE_IOERR_FSYNC']) {
      const err = Object.assign(new Error(`${code}: something failed`), { code });
      const local = asTidemarkError(err);
      assert.equal(local.code, 'E_STORAGE', code);
      assert.equal(local.retryable, true, code);
      assert.doesNotMatch(local.message, /receiver/, 'without context the message does not blame the receiver');
      const remote = asTidemarkError(err, { storage: 'receiver' });
      assert.equal(remote.exitCode, 11);
      assert.match(remote.message, code.startsWith('SQLITE_IOERR') ? /receiver storage I\/O error/ : /receiver disk full/);
      assert.match(remote.message, /free space|check the disk/);
      assert.equal(remote.cause, err);
    }
    assert.equal(asTidemarkError(Object.assign(new Error('x'), { code: 'SQLITE_BUSY' })).code, 'E_INTERNAL');
  });

  it('names the agent state directory for its full disk, and not for another path\'s', () => {
    const stateDir = '/var/lib/tidemark';
    const write = Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
    assert.match(asTidemarkError(write, { stateDir }).message, /^this host's disk is full: no space left for the agent state directory \/var\/lib\/tidemark .*free space on that filesystem/);
    const inside = Object.assign(new Error('ENOSPC: open'), { code: 'ENOSPC', path: '/var/lib/tidemark/hashes/1.pending.xxh64' });
    assert.match(asTidemarkError(inside, { stateDir }).message, /agent state directory \/var\/lib\/tidemark/);
    const io = Object.assign(new Error('disk I/O error'), { code: 'SQLITE_IOERR_SHMSIZE' });
    assert.match(asTidemarkError(io, { stateDir }).message, /storage I\/O error in the agent state directory \/var\/lib\/tidemark/);
    for (const path of ['/srv/image.img', '/var/lib/tidemark-other/x']) {
      const elsewhere = Object.assign(new Error('ENOSPC: open'), { code: 'ENOSPC', path });
      assert.doesNotMatch(asTidemarkError(elsewhere, { stateDir }).message, /state directory/, path);
    }
  });

  it('a full catalog fails the batch with E_STORAGE, references nothing half-written, and works again with room', async () => {
    const dir = tempDir();
    const catalog = Catalog.open(join(dir, 'catalog.db'));
    const store = new LocalPackStore(join(dir, 'packs'), catalog);
    try {
      const first = randomBytes(32);
      assert.equal(await store.put(VAULT, first, envelope(4096)), true);
      // Cap the catalog at its current size: the next chunk rows do not fit.
      const pages = catalog.db.pragma('page_count', { simple: true }) as number;
      catalog.db.pragma(`max_page_count = ${pages}`);
      const ids = Array.from({ length: 400 }, () => randomBytes(32));
      const results = await Promise.allSettled(ids.map((id) => store.put(VAULT, id, envelope(1024))));
      const failed = results.filter((r) => r.status === 'rejected').map((r) => (r as PromiseRejectedResult).reason as TidemarkError);
      assert.ok(failed.length > 0, 'some puts failed on the full catalog');
      assert.equal(failed[0]!.code, 'E_STORAGE');
      assert.equal(failed[0]!.retryable, true);
      assert.match(failed[0]!.message, /receiver disk full/);
      for (const [i, r] of results.entries()) {
        assert.equal(catalog.hasChunk(VAULT, ids[i]!), r.status === 'fulfilled', `chunk ${i} is catalogued iff its put succeeded`);
      }
      // Every pack file ends at the catalogued size: the failed batch was cut back.
      const packDir = join(dir, 'packs', VAULT);
      const sizes = new Map(catalog.packUsage().map((p) => [p.file, p.sizeBytes]));
      for (const name of readdirSync(packDir)) {
        assert.equal(statSync(join(packDir, name)).size, sizes.get(join(VAULT, name)), `pack ${name} holds only catalogued entries`);
      }
      // Room again: puts succeed, and what was stored before reads back.
      catalog.db.pragma('max_page_count = 1073741823');
      const later = randomBytes(32);
      assert.equal(await store.put(VAULT, later, envelope(2048)), true);
      assert.equal((await store.get(VAULT, first)).length, 4096);
      assert.equal((await store.get(VAULT, later)).length, 2048);
    } finally {
      await store.close();
      catalog.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('logs a storage failure once, reminds at most once per interval, and logs the recovery', () => {
    const { log, lines } = recordingLogger();
    const alarm = new StorageAlarm(log, 60_000);
    const batch = new TidemarkError('E_STORAGE', 'receiver disk full: ...');
    for (let i = 0; i < 50; i++) alarm.failed(batch, { type: 'chunk.put' }); // one failed batch of 50 chunks
    for (let i = 0; i < 5; i++) alarm.failed(new TidemarkError('E_STORAGE', 'receiver disk full: ...'), { type: 'chunk.put' }); // retries
    assert.equal(lines.filter((l) => l.level === 'error').length, 1);
    alarm.succeeded();
    assert.equal(lines.at(-1)!.msg, 'receiver storage writable again');
    assert.equal(lines.at(-1)!.obj.failuresNotLogged, 5);
    alarm.failed(new TidemarkError('E_STORAGE', 'again'), { type: 'blocks.put' });
    assert.equal(lines.filter((l) => l.level === 'error').length, 2, 'a new failure after a recovery is logged');
    const quick = new StorageAlarm(log, 0);
    quick.failed(new TidemarkError('E_STORAGE', 'x'), {});
    quick.failed(new TidemarkError('E_STORAGE', 'y'), {});
    assert.equal(lines.at(-1)!.msg, 'receiver storage still failing');
  });
});
