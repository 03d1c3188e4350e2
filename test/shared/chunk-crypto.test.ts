import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { CHUNK_HEADER_BYTES, CHUNK_OVERHEAD_BYTES, VaultKeys, chunkId, openChunk, sealChunk } from '../../shared/chunk-crypto.js';
import { TidemarkError } from '../../shared/errors.js';

const keys = VaultKeys.fromMaster(randomBytes(32));
const other = VaultKeys.fromMaster(randomBytes(32));
const BLOCK = 65536;

function assertIntegrityError(fn: () => unknown): void {
  assert.throws(fn, (err: unknown) => err instanceof TidemarkError && err.code === 'E_INTEGRITY');
}

describe('chunk envelope', () => {
  it('round-trips compressible and incompressible blocks', () => {
    for (const plaintext of [Buffer.alloc(BLOCK, 'abc'), randomBytes(BLOCK), randomBytes(100)]) {
      const id = chunkId(keys, plaintext);
      const envelope = sealChunk(keys, id, plaintext);
      assert.deepEqual(openChunk(keys, id, envelope, BLOCK), plaintext);
    }
  });

  it('compresses what compresses and stores the rest raw', () => {
    const text = Buffer.alloc(BLOCK, 'tidemark ');
    assert.ok(sealChunk(keys, chunkId(keys, text), text).length < BLOCK / 10);
    const noise = randomBytes(BLOCK);
    const sealed = sealChunk(keys, chunkId(keys, noise), noise);
    assert.equal(sealed.length, BLOCK + CHUNK_OVERHEAD_BYTES);
    assert.equal(sealed[5], 0, 'lz4 flag clear');
  });

  it('ids are keyed: the same block has different ids in different vaults', () => {
    const block = Buffer.alloc(BLOCK, 7);
    assert.deepEqual(chunkId(keys, block), chunkId(keys, block));
    assert.notDeepEqual(chunkId(keys, block), chunkId(other, block));
    assert.notEqual(keys.vaultId, other.vaultId);
  });

  it('every envelope is sealed under a fresh salt and nonce', () => {
    const block = Buffer.alloc(BLOCK, 1);
    const id = chunkId(keys, block);
    assert.notDeepEqual(sealChunk(keys, id, block).subarray(8, CHUNK_HEADER_BYTES), sealChunk(keys, id, block).subarray(8, CHUNK_HEADER_BYTES));
  });

  it('detects a flipped bit anywhere, a swapped id and a foreign key', () => {
    const block = randomBytes(BLOCK);
    const id = chunkId(keys, block);
    const envelope = sealChunk(keys, id, block);
    for (const offset of [5, 10, 30, CHUNK_HEADER_BYTES + 5, envelope.length - 1]) {
      const damaged = Buffer.from(envelope);
      damaged[offset]! ^= 0x01;
      assertIntegrityError(() => openChunk(keys, id, damaged, BLOCK));
    }
    const otherBlock = randomBytes(BLOCK);
    const otherId = chunkId(keys, otherBlock);
    assertIntegrityError(() => openChunk(keys, otherId, envelope, BLOCK));
    assertIntegrityError(() => openChunk(other, id, envelope, BLOCK));
  });

  it('rejects envelopes of impossible size or unknown version before decrypting', () => {
    const block = randomBytes(1000);
    const id = chunkId(keys, block);
    const envelope = sealChunk(keys, id, block);
    assert.throws(() => openChunk(keys, id, envelope.subarray(0, 20), BLOCK), /outside the legal size/);
    const future = Buffer.from(envelope);
    future[4] = 99;
    assert.throws(() => openChunk(keys, id, future, BLOCK), /unknown magic or version/);
  });
});
