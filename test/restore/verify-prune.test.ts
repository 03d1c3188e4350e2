// tidemark-restore verify --read-data beside the receiver's scheduled prune: a point listed
// at the start and dropped by prune before its check is not damage and does not end the run
// ("no point N that this credential may read", exit 9, seen in a soak with serve pruning).
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { VaultKeys } from '../../shared/chunk-crypto.js';
import { ReceiverConnection } from '../../shared/connection.js';
import { openKeyFile } from '../../shared/keyfile.js';
import { SESSION_PATH, type PointInfo } from '../../shared/protocol.js';
import { verifyPoints } from '../../restore/verify.js';
import { Deployment, PASSPHRASE, runJson } from '../harness.js';
import { changeBlocks, writeMixedImage } from '../fixtures.js';

const MiB = 1024 * 1024;

describe('restore verify beside prune', () => {
  let d: Deployment;
  let conn: ReceiverConnection;
  let keys: VaultKeys;
  before(async () => {
    d = await Deployment.start();
    await d.enroll('alpha');
    const disk = join(d.root, 'alpha.img');
    await writeMixedImage(disk, 8 * MiB, 5);
    await d.syncOnce('alpha', [disk]);
    await changeBlocks(disk, 64 * 1024, 8, 9);
    await d.syncOnce('alpha', [disk]);
    keys = VaultKeys.fromMaster(openKeyFile(d.keyFile, PASSPHRASE));
    conn = await ReceiverConnection.open({ url: d.receiver.url, fingerprint: d.receiver.fingerprint, path: SESSION_PATH, authorization: `Bearer ${d.restoreToken}` });
    await conn.hello({ vaultId: keys.vaultId, vaultProof: keys.vaultProof });
  });
  after(async () => {
    conn?.close();
    await d?.close();
  });

  it('skips a point prune dropped after the listing, and checks the rest', async () => {
    const { points } = await conn.request('points.list', { host: 'alpha', afterId: null });
    assert.equal(points.length, 2);
    const listed: PointInfo[] = points;
    const report = await runJson('receiver', ['prune', '--data', d.receiver.dataDir, '--keep-within', '0s', '--keep-hourly', '0', '--keep-daily', '0', '--keep-weekly', '0']);
    assert.equal(report.pointsDropped, 1, 'prune drops the first point (the last one is always kept)');

    const verified = await verifyPoints(conn, keys, listed);
    assert.equal(verified.ok, true, JSON.stringify(verified.damaged));
    assert.equal(verified.pointsChecked, 1);
    assert.equal(verified.pointsPruned, 1);
    assert.deepEqual(verified.damaged, []);
  });
});
