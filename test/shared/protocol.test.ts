import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { MAX_BLOCK_BYTES, MAX_FRAME_BYTES, MAX_GET_REPLY_BYTES, MAX_IDS_PER_GET, chunkPutFrame, chunksReplyFrame, decodeReply, decodeRequest, encodeFrame, errorFrame, okFrame, parseReply } from '../../shared/protocol.js';
import { CHUNK_OVERHEAD_BYTES } from '../../shared/chunk-crypto.js';
import { TidemarkError } from '../../shared/errors.js';

const protocolError = (re: RegExp) => (e: unknown) => e instanceof TidemarkError && e.code === 'E_PROTOCOL' && re.test(e.message);

describe('protocol frames', () => {
  it('decodes a valid request with binary fields as Buffers', () => {
    const req = decodeRequest(encodeFrame({ t: 'chunk.get', rid: 3, id: Buffer.alloc(32, 9) }));
    assert.equal(req.t, 'chunk.get');
    assert.ok(req.t === 'chunk.get' && Buffer.isBuffer(req.id));
  });

  it('names what is wrong with a bad request', () => {
    assert.throws(() => decodeRequest(encodeFrame({ t: 'hello', rid: 1, vaultId: 'x' }).subarray(0, 9)), protocolError(/not valid msgpack/));
    assert.throws(() => decodeRequest(encodeFrame([1, 2])), protocolError(/not a msgpack map/));
    assert.throws(() => decodeRequest(encodeFrame({ t: 'nope', rid: 1 })), protocolError(/unknown message type/));
    for (const t of ['constructor', '__proto__', 'toString', 'hasOwnProperty']) {
      assert.throws(() => decodeRequest(encodeFrame({ t, rid: 1 })), protocolError(/unknown message type/), t);
    }
    assert.throws(() => decodeRequest(encodeFrame({ t: 'chunk.get', rid: 1, id: Buffer.alloc(31) })), protocolError(/malformed chunk.get: id/));
    assert.throws(() => decodeRequest(encodeFrame({ t: 'disk.register', rid: 1, name: 'd', sizeBytes: 1, sectorBytes: 512, blockBytes: 3000 })), protocolError(/blockBytes/));
    assert.throws(() => decodeRequest(encodeFrame({ t: 'blocks.put', rid: 1, pointId: 1, diskId: 1, blocks: [1, 2], ids: [null] })), protocolError(/differ in length/));
    assert.throws(() => decodeRequest(encodeFrame({ t: 'chunks.query', rid: 1, ids: Array(4097).fill(Buffer.alloc(32)) })), protocolError(/ids/));
  });

  it('round-trips replies and errors with their stable codes', () => {
    const ok = decodeReply(okFrame(5, { pointId: 9 }));
    assert.equal(ok.t, 'ok');
    assert.equal(ok.rid, 5);
    const err = decodeReply(errorFrame(6, new TidemarkError('E_FORBIDDEN', 'no')));
    assert.ok(err.t === 'error' && err.error.code === 'E_FORBIDDEN' && err.rid === 6 && !err.error.retryable);
    // An unknown code is read as E_PROTOCOL, also one that names a property every object has.
    for (const code of ['E_NOPE', 'toString', 'constructor', '__proto__']) {
      const odd = decodeReply(encodeFrame({ t: 'error', rid: 7, code, message: 'odd', retryable: false }));
      assert.ok(odd.t === 'error' && odd.error.code === 'E_PROTOCOL' && odd.error.exitCode === 8, code);
    }
  });

  it('writes a chunk.put that decodes as encodeFrame does, into the memory it is given', () => {
    const id = Buffer.alloc(32, 5);
    for (const [rid, data] of [[0, Buffer.alloc(52, 1)], [9, Buffer.alloc(70_000, 2)], [0xffffffff, Buffer.alloc(MAX_BLOCK_BYTES + CHUNK_OVERHEAD_BYTES, 3)]] as const) {
      const memory = Buffer.alloc(MAX_FRAME_BYTES + 10, 0xee);
      const frame = chunkPutFrame(rid, id, data, (bytes) => memory.subarray(10, 10 + bytes));
      assert.equal(frame.buffer, memory.buffer);
      assert.ok(frame.length <= MAX_FRAME_BYTES, `${frame.length} bytes`);
      assert.deepEqual(decodeRequest(frame), decodeRequest(encodeFrame({ t: 'chunk.put', rid, id, data })));
      assert.equal(memory[10 + frame.length], 0xee, 'nothing written past the frame');
    }
  });

  it('writes a chunks.get reply that decodes as okFrame does, within a frame at its largest', () => {
    const envelopes = [Buffer.alloc(52, 1), Buffer.alloc(70_000, 2), Buffer.alloc(300, 3)];
    for (const rid of [0, 7, 0xffffffff]) {
      const direct = decodeReply(chunksReplyFrame(rid, envelopes));
      const packed = decodeReply(okFrame(rid, { data: envelopes }));
      assert.ok(direct.t === 'ok' && packed.t === 'ok');
      assert.equal(direct.rid, rid);
      assert.deepEqual(parseReply('chunks.get', direct.body), parseReply('chunks.get', packed.body));
    }
    // The largest reply the receiver sends: one maximal envelope, or up to MAX_GET_REPLY_BYTES over MAX_IDS_PER_GET envelopes.
    const largest = chunksReplyFrame(0xffffffff, [...Array(MAX_IDS_PER_GET - 1)].map(() => Buffer.alloc(1)).concat(Buffer.alloc(MAX_GET_REPLY_BYTES - (MAX_IDS_PER_GET - 1))));
    assert.ok(largest.length <= MAX_FRAME_BYTES, `${largest.length} bytes`);
    assert.equal(MAX_GET_REPLY_BYTES, MAX_BLOCK_BYTES + CHUNK_OVERHEAD_BYTES);
  });
});
