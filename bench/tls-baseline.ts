// Baseline for the transport: a number of bytes written in 64 KiB pieces
// through Node's TLS to a second process on loopback, which reads and drops
// them. An initial sync moves its stored bytes this way (plus WebSocket
// framing), so it pays at least this much wall time and CPU before any work
// on the data.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { connect } from 'node:tls';
import { generate } from 'selfsigned';

export interface TlsBaseline {
  seconds: number;
  mibps: number;
  /** CPU seconds of both ends (user + system) while the bytes moved. */
  cpuSeconds: number;
}

/** The reading end: reports its CPU time from the handshake to the end of the stream. */
const READER = `
import { createServer } from 'node:tls';
const server = createServer({ key: process.env.BENCH_TLS_KEY, cert: process.env.BENCH_TLS_CERT }, (socket) => {
  const start = process.cpuUsage();
  socket.on('data', () => {});
  socket.on('end', () => {
    const used = process.cpuUsage(start);
    process.stdout.write(JSON.stringify({ cpuSeconds: (used.user + used.system) / 1e6 }) + '\\n');
    socket.end();
    server.close();
  });
});
server.listen(0, '127.0.0.1', () => process.stdout.write(JSON.stringify({ port: server.address().port }) + '\\n'));
`;

export async function tlsLoopback(bytes: number): Promise<TlsBaseline> {
  const pems = await generate([{ name: 'commonName', value: 'tidemark-bench' }], { keyType: 'ec', curve: 'P-256', algorithm: 'sha256' });
  const reader = spawn(process.execPath, ['--input-type=module', '-e', READER], {
    env: { ...process.env, BENCH_TLS_KEY: pems.private, BENCH_TLS_CERT: pems.cert },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: reader.stdout! })[Symbol.asyncIterator]();
  const nextLine = async () => {
    const { value, done } = await lines.next();
    if (done) throw new Error('the TLS baseline reader exited early');
    return JSON.parse(value) as Record<string, number>;
  };
  try {
    const { port } = await nextLine();
    // Our own child on loopback: trusted by its certificate, whatever name it carries.
    const socket = connect({ host: '127.0.0.1', port, ca: pems.cert, checkServerIdentity: () => undefined });
    await once(socket, 'secureConnect');
    const piece = randomBytes(64 * 1024);
    const start = process.hrtime.bigint();
    const cpuStart = process.cpuUsage();
    for (let sent = 0; sent < bytes; sent += piece.length) {
      if (!socket.write(piece)) await once(socket, 'drain');
    }
    socket.end();
    const { cpuSeconds: readerCpuSeconds } = await nextLine();
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    const writer = process.cpuUsage(cpuStart);
    socket.destroy();
    return { seconds, mibps: bytes / 1024 / 1024 / seconds, cpuSeconds: (writer.user + writer.system) / 1e6 + readerCpuSeconds! };
  } finally {
    reader.kill();
  }
}
