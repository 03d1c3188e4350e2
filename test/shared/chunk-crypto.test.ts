import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from 'node:crypto';
import { CHUNK_HEADER_BYTES, CHUNK_OVERHEAD_BYTES, VaultKeys, chunkId, openChunk, sealChunk } from '../../shared/chunk-crypto.js';
import { TidemarkError } from '../../shared/errors.js';
import { compressSync } from 'lz4-napi';

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

  it('follows SPEC §4 as written: node\'s own hkdf gives the key that opens a sealed envelope and seals one openChunk opens', () => {
    const specKey = (salt: Buffer) => Buffer.from(hkdfSync('sha256', keys.encRoot, salt, 'tidemark chunk v1', 32));
    for (const plaintext of [randomBytes(BLOCK), randomBytes(1000)]) {
      const id = chunkId(keys, plaintext);
      const envelope = sealChunk(keys, id, plaintext);
      const header = envelope.subarray(0, CHUNK_HEADER_BYTES);
      assert.equal(header[5], 0, 'random data is stored raw');
      const decipher = createDecipheriv('aes-256-gcm', specKey(header.subarray(8, 24)), header.subarray(24, 36));
      decipher.setAAD(Buffer.concat([header, id]));
      decipher.setAuthTag(envelope.subarray(envelope.length - 16));
      const body = envelope.subarray(CHUNK_HEADER_BYTES, envelope.length - 16);
      assert.deepEqual(Buffer.concat([decipher.update(body), decipher.final()]), plaintext);

      const built = Buffer.from(header);
      randomBytes(28).copy(built, 8); // a fresh salt and nonce
      const cipher = createCipheriv('aes-256-gcm', specKey(built.subarray(8, 24)), built.subarray(24, 36));
      cipher.setAAD(Buffer.concat([built, id]));
      const specEnvelope = Buffer.concat([built, cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
      assert.deepEqual(openChunk(keys, id, specEnvelope, BLOCK), plaintext);
    }
  });

  it('an authentic envelope whose lz4 body lies about its size or is not lz4 is E_INTEGRITY, before any large allocation', () => {
    // What a holder of the vault key could upload under a block's id (dedup poisoning, SPEC §10).
    const sealLz4 = (plaintext: Buffer, body: Buffer) => {
      const header = Buffer.alloc(CHUNK_HEADER_BYTES);
      header.write('TMCH', 0, 'latin1');
      header[4] = 1;
      header[5] = 1; // LZ4
      randomBytes(28).copy(header, 8);
      const id = chunkId(keys, plaintext);
      const cipher = createCipheriv('aes-256-gcm', Buffer.from(hkdfSync('sha256', keys.encRoot, header.subarray(8, 24), 'tidemark chunk v1', 32)), header.subarray(24, 36));
      cipher.setAAD(Buffer.concat([header, id]));
      return { id, envelope: Buffer.concat([header, cipher.update(body), cipher.final(), cipher.getAuthTag()]) };
    };
    const plaintext = Buffer.alloc(BLOCK, 'abc');
    const honest = sealLz4(plaintext, compressSync(plaintext));
    assert.deepEqual(openChunk(keys, honest.id, honest.envelope, BLOCK), plaintext, 'the hand-made envelope is a valid one');
    const lying = compressSync(plaintext);
    lying.writeUInt32LE(0xffffffff, 0); // declares 4 GiB
    const started = Date.now();
    assertIntegrityError(() => openChunk(keys, honest.id, sealLz4(plaintext, lying).envelope, BLOCK));
    assert.ok(Date.now() - started < 1000, `refused in ${Date.now() - started} ms`);
    const garbage = Buffer.concat([Buffer.from([0, 0, 1, 0]), Buffer.alloc(100, 0xf0)]);
    assertIntegrityError(() => openChunk(keys, honest.id, sealLz4(plaintext, garbage).envelope, BLOCK));
  });

  it('compresses what compresses and stores the rest raw', () => {
    const text = Buffer.alloc(BLOCK, 'tidemark ');
    assert.ok(sealChunk(keys, chunkId(keys, text), text).length < BLOCK / 10);
    const noise = randomBytes(BLOCK);
    const sealed = sealChunk(keys, chunkId(keys, noise), noise);
    assert.equal(sealed.length, BLOCK + CHUNK_OVERHEAD_BYTES);
    assert.equal(sealed[5], 0, 'lz4 flag clear');
  });

  it('skips lz4 on a block whose sampled slices do not compress, and only then', () => {
    // Four 1 KiB slices, one at the start of each quarter, are compressed first (worthCompressing).
    const slicesNoise = Buffer.alloc(BLOCK, 'tidemark ');
    for (let q = 0; q < 4; q++) randomBytes(1024).copy(slicesNoise, q * (BLOCK / 4));
    const skipped = sealChunk(keys, chunkId(keys, slicesNoise), slicesNoise);
    assert.equal(skipped.length, BLOCK + CHUNK_OVERHEAD_BYTES, 'stored raw, although the block as a whole would compress');
    assert.equal(skipped[5], 0, 'lz4 flag clear');
    assert.deepEqual(openChunk(keys, chunkId(keys, slicesNoise), skipped, BLOCK), slicesNoise);

    const halfNoise = Buffer.alloc(BLOCK, 'tidemark ');
    randomBytes(BLOCK / 2).copy(halfNoise, BLOCK / 4); // noise under two of the four slices
    const compressed = sealChunk(keys, chunkId(keys, halfNoise), halfNoise);
    assert.ok(compressed.length < BLOCK * 0.6, `half of it compresses: ${compressed.length} bytes`);
    assert.equal(compressed[5], 1, 'lz4 flag set');
    assert.deepEqual(openChunk(keys, chunkId(keys, halfNoise), compressed, BLOCK), halfNoise);
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
    // Salts and nonces come from the CSPRNG in batches: none repeats across batch boundaries either.
    const seen = new Set<string>();
    for (let i = 0; i < 1000; i++) seen.add(sealChunk(keys, id, block).subarray(8, CHUNK_HEADER_BYTES).toString('hex'));
    assert.equal(seen.size, 1000);
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
