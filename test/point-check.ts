// In-process reads of a receiver for tests that check many points quickly: list
// the committed points over the protocol and hash a point's disk image as a
// restore would rebuild it (every chunk opened and checked with the key). The
// CLI restore costs a process and a key derivation per call; loops that check
// after every kill use this, and spot-check with the real `tidemark-restore`.
import { createHash } from 'node:crypto';
import { VaultKeys, openChunk } from '../shared/chunk-crypto.js';
import { ReceiverConnection } from '../shared/connection.js';
import { openKeyFile } from '../shared/keyfile.js';
import { MAX_MAP_PAGE, SESSION_PATH, type PointInfo } from '../shared/protocol.js';
import { PASSPHRASE, type Deployment } from './harness.js';

export function vaultKeys(keyFile: string): VaultKeys {
  return VaultKeys.fromMaster(openKeyFile(keyFile, PASSPHRASE));
}

/** A session with the deployment's restore token, hello done. */
export async function restoreSession(d: Deployment, keys: VaultKeys): Promise<ReceiverConnection> {
  const conn = await ReceiverConnection.open({ url: d.receiver.url, fingerprint: d.receiver.fingerprint, path: SESSION_PATH, authorization: `Bearer ${d.restoreToken}` });
  try {
    await conn.hello({ vaultId: keys.vaultId, vaultProof: keys.vaultProof });
  } catch (err) {
    conn.close();
    throw err;
  }
  return conn;
}

/** Every committed point of a host, oldest first (all pages). */
export async function listPoints(conn: ReceiverConnection, host: string): Promise<PointInfo[]> {
  const points: PointInfo[] = [];
  let afterId: number | null = null;
  do {
    const page: { points: PointInfo[]; next: number | null } = await conn.request('points.list', { host, afterId });
    points.push(...page.points);
    afterId = page.next;
  } while (afterId !== null);
  return points;
}

/** SHA-256 of the point's (only) disk as a restore writes it: map pages, chunks opened and checked, zeros elsewhere. */
export async function pointSha256(conn: ReceiverConnection, keys: VaultKeys, point: PointInfo): Promise<string> {
  const disk = point.disks[0]!;
  const image = Buffer.alloc(disk.sizeBytes);
  const blockCount = Math.ceil(disk.sizeBytes / disk.blockBytes);
  let fromBlock: number | null = 0;
  while (fromBlock !== null && fromBlock < blockCount) {
    const page: { blocks: number[]; ids: Buffer[]; next: number | null } = await conn.request('point.map', { pointId: point.id, diskId: disk.diskId, fromBlock, limit: MAX_MAP_PAGE });
    await Promise.all(page.blocks.map(async (block, i) => {
      if (block >= blockCount) return;
      const id = page.ids[i]!;
      const { data } = await conn.request('chunk.get', { id });
      const plaintext = openChunk(keys, id, data, disk.blockBytes);
      const length = Math.min(disk.blockBytes, disk.sizeBytes - block * disk.blockBytes);
      if (plaintext.length !== length) throw new Error(`point ${point.id} block ${block}: chunk of ${plaintext.length} bytes, expected ${length}`);
      plaintext.copy(image, block * disk.blockBytes);
    }));
    fromBlock = page.next;
  }
  return createHash('sha256').update(image).digest('hex');
}
