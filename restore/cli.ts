// tidemark-restore: points, disk (CLI contract: DESIGN §9, README).
// A client of the receiver that holds the vault key: it decrypts locally.
import { Command, Option } from 'commander';
import { VaultKeys } from '../shared/chunk-crypto.js';
import { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import { openKeyFile } from '../shared/keyfile.js';
import { SESSION_PATH, type PointInfo } from '../shared/protocol.js';
import { passphraseFileOption, printJson, readPassphrase, readToken, runCli } from '../shared/cli-util.js';
import { formatBytes } from '../shared/units.js';
import { restoreDisk } from './restore-disk.js';

interface ConnectOptions {
  receiver: string;
  fingerprint: string;
  token?: string;
  keyFile: string;
  passphraseFile?: string;
  host?: string;
  json?: boolean;
}

function withConnectOptions(cmd: Command): Command {
  return cmd
    .requiredOption('--receiver <url>', 'receiver address, wss://HOST:PORT')
    .requiredOption('--fingerprint <fp>', 'receiver TLS certificate fingerprint')
    .option('--token <token>', 'restore token or host credential (or TIDEMARK_TOKEN)')
    .requiredOption('--key-file <file>', 'vault key file (passphrase from TIDEMARK_PASSPHRASE)')
    .addOption(passphraseFileOption())
    .option('--host <name>', 'host whose points to use')
    .option('--json', 'print one JSON document');
}

async function connect(opts: ConnectOptions): Promise<{ conn: ReceiverConnection; keys: VaultKeys }> {
  const keys = VaultKeys.fromMaster(openKeyFile(opts.keyFile, readPassphrase(opts.passphraseFile)));
  const conn = await ReceiverConnection.open({ url: opts.receiver, fingerprint: opts.fingerprint, path: SESSION_PATH, authorization: `Bearer ${readToken(opts.token)}` });
  try {
    await conn.request('hello', { vaultId: keys.vaultId });
  } catch (err) {
    conn.close();
    throw err;
  }
  return { conn, keys };
}

async function listPoints(conn: ReceiverConnection, host: string | null): Promise<PointInfo[]> {
  const points: PointInfo[] = [];
  let afterId: number | null = null;
  do {
    const page: { points: PointInfo[]; next: number | null } = await conn.request('points.list', { host, afterId });
    points.push(...page.points);
    afterId = page.next;
  } while (afterId !== null);
  return points;
}

function pointJson(p: PointInfo) {
  return {
    id: p.id, host: p.host, time: new Date(p.timeMs).toISOString(), committedAt: new Date(p.committedMs).toISOString(), crashConsistent: p.crashConsistent,
    disks: p.disks.map((d) => ({ name: d.name, sizeBytes: d.sizeBytes, changedBytes: d.changedBytes, blockBytes: d.blockBytes })),
  };
}

/** --point ID, or --at TIME: the newest point at or before TIME. */
function choosePoint(points: PointInfo[], opts: { point?: string; at?: string; host?: string }): PointInfo {
  if ((opts.point === undefined) === (opts.at === undefined)) throw new TidemarkError('E_USAGE', 'choose a point with exactly one of --point ID or --at TIME');
  if (opts.point !== undefined) {
    const found = points.find((p) => String(p.id) === opts.point);
    if (!found) throw new TidemarkError('E_NOT_FOUND', `no point ${opts.point} for host ${opts.host}; list them with tidemark-restore points`);
    return found;
  }
  const atMs = Date.parse(opts.at!);
  if (Number.isNaN(atMs)) throw new TidemarkError('E_USAGE', `invalid --at "${opts.at}": use an ISO-8601 time such as 2026-11-21T10:00:00Z`);
  // Newest by cut time (a later point wins a tie), whatever order the ids are in.
  const found = points.filter((p) => p.timeMs <= atMs).reduce<PointInfo | undefined>((best, p) => (!best || p.timeMs >= best.timeMs ? p : best), undefined);
  if (!found) throw new TidemarkError('E_NOT_FOUND', `host ${opts.host} has no point at or before ${new Date(atMs).toISOString()}`);
  return found;
}

const program = new Command('tidemark-restore').description('Tidemark restore: list recovery points and bring disks back');

withConnectOptions(program.command('points').description('list recovery points, oldest first'))
  .action(async (opts: ConnectOptions) => {
    const { conn } = await connect(opts);
    try {
      const points = await listPoints(conn, opts.host ?? null);
      if (opts.json) return printJson({ points: points.map(pointJson) });
      for (const p of points) {
        const disks = p.disks.map((d) => `${d.name} ${formatBytes(d.sizeBytes)} (+${formatBytes(d.changedBytes)})`).join(', ');
        process.stdout.write(`${p.id}\t${new Date(p.timeMs).toISOString()}\t${p.host}\t${p.crashConsistent ? 'consistent' : 'NOT crash-consistent'}\t${disks}\n`);
      }
    } finally {
      conn.close();
    }
  });

withConnectOptions(program.command('disk').description('restore one disk of a point to an image file or block device'))
  .requiredOption('--disk <name>', 'disk name as the agent reported it (its path on the protected host)')
  .option('--point <id>', 'point id')
  .option('--at <time>', 'newest point at or before this time (ISO-8601)')
  .requiredOption('--to <path>', 'image file to create (sparse) or block device to overwrite')
  .addOption(new Option('--failback', 'write only blocks that differ onto an existing disk').hideHelp())
  .action(async (opts: ConnectOptions & { disk: string; point?: string; at?: string; to: string; failback?: boolean }) => {
    if (!opts.host) throw new TidemarkError('E_USAGE', 'pass --host NAME: the host whose disk to restore');
    if (opts.failback) throw new TidemarkError('E_USAGE', '--failback is not available in this version; restore to a new image or device');
    const { conn, keys } = await connect(opts);
    try {
      const points = await listPoints(conn, opts.host);
      const point = choosePoint(points, opts);
      // Progress goes to a TTY on stderr only: with --json, stdout carries one document.
      const result = await restoreDisk(conn, keys, point, opts.disk, opts.to, false);
      if (opts.json) return printJson(result);
      process.stdout.write(`restored ${opts.disk} of point ${point.id} (${new Date(point.timeMs).toISOString()}) to ${opts.to}: ` +
        `${formatBytes(result.bytesWritten)} written, ${formatBytes(result.bytesFetched)} fetched, every chunk verified\n`);
    } finally {
      conn.close();
    }
  });

await runCli(program);
