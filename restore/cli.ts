// tidemark-restore: points, disk (and --failback), export, drill (CLI contract: DESIGN §9, README).
// A client of the receiver that holds the vault key: it decrypts locally.
import { Command } from 'commander';
import { VaultKeys } from '../shared/chunk-crypto.js';
import { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import { openKeyFile } from '../shared/keyfile.js';
import { SESSION_PATH, type PointInfo, type Reply } from '../shared/protocol.js';
import { passphraseFileOption, printJson, printable, readPassphrase, readToken, runCli } from '../shared/cli-util.js';
import { formatBytes, parseDurationMs } from '../shared/units.js';
import { drillPoint, type DrillDiskResult } from './drill.js';
import { exportPoint } from './export.js';
import { failbackDisk } from './failback.js';
import { restoreDisk } from './restore-disk.js';
import { READ_DATA_REQUIRED, runRestoreVerify } from './verify.js';

interface ConnectOptions {
  receiver: string;
  fingerprint: string;
  token?: string;
  tokenFile?: string;
  keyFile: string;
  passphraseFile?: string;
  host?: string;
  json?: boolean;
}

function withConnectOptions(cmd: Command): Command {
  return cmd
    .requiredOption('--receiver <url>', 'receiver address, wss://HOST:PORT')
    .requiredOption('--fingerprint <fp>', 'receiver TLS certificate fingerprint')
    .option('--token <token>', 'restore token or host credential (visible in ps: prefer TIDEMARK_TOKEN or --token-file)')
    .option('--token-file <file>', 'file holding the restore token or host credential')
    .requiredOption('--key-file <file>', 'vault key file (passphrase from TIDEMARK_PASSPHRASE)')
    .addOption(passphraseFileOption())
    .option('--host <name>', 'host whose points to use')
    .option('--json', 'print one JSON document');
}

async function connect(opts: ConnectOptions): Promise<{ conn: ReceiverConnection; keys: VaultKeys }> {
  const keys = VaultKeys.fromMaster(openKeyFile(opts.keyFile, readPassphrase(opts.passphraseFile)));
  const conn = await ReceiverConnection.open({ url: opts.receiver, fingerprint: opts.fingerprint, path: SESSION_PATH, authorization: `Bearer ${readToken(opts.token, opts.tokenFile)}` });
  try {
    await conn.hello({ vaultId: keys.vaultId, vaultProof: keys.vaultProof });
  } catch (err) {
    conn.close();
    throw err;
  }
  return { conn, keys };
}

/** Every point (of `host`, when given), oldest first; a host the receiver does not know in this vault is E_NOT_FOUND. */
async function listPoints(conn: ReceiverConnection, host: string | null): Promise<PointInfo[]> {
  const points: PointInfo[] = [];
  let afterId: number | null = null;
  do {
    const page: Reply<'points.list'> = await conn.request('points.list', { host, afterId });
    // Receivers before hostExists leave it out: then an unknown host lists no points, as it did.
    if (page.hostExists === false) throw unknownHost(host!);
    // Ids after afterId only (the reply schema checks the page's order): else paging would not end.
    if (afterId !== null && page.points.length > 0 && page.points[0]!.id <= afterId) {
      throw new TidemarkError('E_PROTOCOL', `receiver listed point ${page.points[0]!.id} again after point ${afterId}: the receiver is faulty; tell its operator`);
    }
    points.push(...page.points);
    afterId = page.next;
  } while (afterId !== null);
  return points;
}

function unknownHost(host: string): TidemarkError {
  return new TidemarkError('E_NOT_FOUND', `no host named "${host}" in this key file's vault on the receiver; ` +
    'tidemark-restore points without --host lists the hosts that have points (tidemark-receiver status, every host)');
}

function pointJson(p: PointInfo) {
  return {
    id: p.id, host: p.host, time: new Date(p.timeMs).toISOString(), committedAt: new Date(p.committedMs).toISOString(), crashConsistent: p.crashConsistent,
    disks: p.disks.map((d) => ({ name: d.name, sizeBytes: d.sizeBytes, changedBytes: d.changedBytes, blockBytes: d.blockBytes })),
  };
}

/** ISO-8601 as --at takes it: a date, or a date and time with an optional zone (Date.parse alone takes "1" for 2001). */
const ISO_8601 = /^\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?$/;

/** YYYY-MM-DD names a day of the calendar (Date.parse takes 2026-02-30 for 2 March). */
function isCalendarDate(ymd: string): boolean {
  const [y, m, d] = ymd.split('-').map(Number) as [number, number, number];
  const day = new Date(Date.UTC(y, m - 1, d));
  return day.getUTCFullYear() === y && day.getUTCMonth() === m - 1 && day.getUTCDate() === d;
}

/** Exactly one of --point ID and --at TIME, well formed: checked before connecting. */
function checkPointOptions(opts: PointOptions): void {
  if ((opts.point === undefined) === (opts.at === undefined)) throw new TidemarkError('E_USAGE', 'choose a point with exactly one of --point ID or --at TIME');
  if (opts.point !== undefined && !/^\d+$/.test(opts.point)) {
    throw new TidemarkError('E_USAGE', `invalid --point "${opts.point}": use a point id (a whole number) as tidemark-restore points lists them`);
  }
  if (opts.at !== undefined && (!ISO_8601.test(opts.at) || Number.isNaN(Date.parse(opts.at)) || !isCalendarDate(opts.at.slice(0, 10)))) {
    throw new TidemarkError('E_USAGE', `invalid --at "${opts.at}": use an ISO-8601 time such as 2026-11-21T10:00:00Z (or a date, 2026-11-21)`);
  }
}

/**
 * --point ID, or --at TIME: the newest point at or before TIME; with `disk`, the newest
 * that has that disk (a cycle may have run with fewer --disk).
 */
function choosePoint(points: PointInfo[], opts: { point?: string; at?: string; host?: string }, disk?: string): PointInfo {
  checkPointOptions(opts);
  if (opts.point !== undefined) {
    const found = points.find((p) => String(p.id) === opts.point);
    if (!found) throw new TidemarkError('E_NOT_FOUND', `no point ${opts.point} for host ${opts.host}; list them with tidemark-restore points`);
    return found;
  }
  const atMs = Date.parse(opts.at!);
  const candidates = disk === undefined ? points : points.filter((p) => p.disks.some((d) => d.name === disk));
  // Newest by cut time (a later point wins a tie), whatever order the ids are in.
  const found = candidates.filter((p) => p.timeMs <= atMs).reduce<PointInfo | undefined>((best, p) => (!best || p.timeMs >= best.timeMs ? p : best), undefined);
  if (!found) throw new TidemarkError('E_NOT_FOUND', `host ${opts.host} has no point ${disk === undefined ? '' : `with disk ${disk} `}at or before ${new Date(atMs).toISOString()}`);
  return found;
}

interface PointOptions {
  point?: string;
  at?: string;
}

function withPointOptions(cmd: Command): Command {
  return cmd
    .option('--point <id>', 'point id')
    .option('--at <time>', 'newest point at or before this time (ISO-8601, e.g. 2026-11-21T10:00:00Z; without a zone: local time)');
}

/** The host's point named by --point or --at (the one selection every restore mode uses); `disk`: one it must have. */
async function selectPoint(conn: ReceiverConnection, opts: ConnectOptions & PointOptions, disk?: string): Promise<PointInfo> {
  return choosePoint(await listPoints(conn, opts.host!), opts, disk);
}

function requireHost(opts: ConnectOptions, what: string): void {
  if (!opts.host) throw new TidemarkError('E_USAGE', `pass --host NAME: the host whose ${what}`);
}

const program = new Command('tidemark-restore').description('Tidemark restore: list recovery points and bring disks back');

withConnectOptions(program.command('points').description('list recovery points, oldest first'))
  .action(async (opts: ConnectOptions) => {
    const { conn } = await connect(opts);
    try {
      const points = await listPoints(conn, opts.host ?? null);
      if (opts.json) return printJson({ points: points.map(pointJson) });
      for (const p of points) {
        // Host and disk names are what the receiver says (and its agents told it).
        const disks = p.disks.map((d) => `${printable(d.name)} ${formatBytes(d.sizeBytes)} (+${formatBytes(d.changedBytes)})`).join(', ');
        process.stdout.write(`${p.id}\t${new Date(p.timeMs).toISOString()}\t${printable(p.host)}\t${p.crashConsistent ? 'consistent' : 'NOT crash-consistent'}\t${disks}\n`);
      }
    } finally {
      conn.close();
    }
  });

withPointOptions(withConnectOptions(program.command('disk').description('restore one disk of a point to an image file or block device, or (--failback) update an existing one')))
  .requiredOption('--disk <name>', 'disk name as the agent reported it (its path on the protected host)')
  .requiredOption('--to <path>', 'image file to create (sparse) or block device to overwrite; with --failback, the existing disk or image to update')
  .option('--failback', 'update an existing disk in place: compare every block, fetch and write only those that differ')
  .action(async (opts: ConnectOptions & PointOptions & { disk: string; to: string; failback?: boolean }) => {
    requireHost(opts, 'disk to restore');
    checkPointOptions(opts);
    const { conn, keys } = await connect(opts);
    try {
      const point = await selectPoint(conn, opts, opts.disk);
      // Progress goes to a TTY on stderr only: with --json, stdout carries one document.
      const result = opts.failback
        ? await failbackDisk(conn, keys, point, opts.disk, opts.to)
        : await restoreDisk(conn, keys, point, opts.disk, opts.to);
      if (opts.json) return printJson(result);
      const compared = opts.failback ? `, ${result.blocksCompared} blocks compared` : '';
      process.stdout.write(`${opts.failback ? 'failed back' : 'restored'} ${opts.disk} of point ${point.id} (${new Date(point.timeMs).toISOString()}) to ${opts.to}: ` +
        `${formatBytes(result.bytesWritten)} written, ${formatBytes(result.bytesFetched)} fetched${compared}, every chunk verified\n`);
    } finally {
      conn.close();
    }
  });

withPointOptions(withConnectOptions(program.command('export').description('write every disk of a point and a manifest as one tar stream')))
  .requiredOption('--to <file>', 'tar file to create, or - for stdout')
  .action(async (opts: ConnectOptions & PointOptions & { to: string }) => {
    requireHost(opts, 'point to export');
    checkPointOptions(opts);
    if (opts.to === '-' && opts.json) throw new TidemarkError('E_USAGE', '--json needs --to FILE: with --to - stdout carries the tar');
    const { conn, keys } = await connect(opts);
    try {
      const result = await exportPoint(conn, keys, await selectPoint(conn, opts), opts.to);
      if (opts.to === '-') return; // stdout was the tar
      if (opts.json) return printJson(result);
      process.stdout.write(`exported point ${result.point} (${result.manifest.point.time}) of ${printable(result.host)} to ${opts.to}: ` +
        `${result.manifest.disks.length} disk${result.manifest.disks.length === 1 ? '' : 's'}, ${formatBytes(result.bytesWritten)}, every chunk verified\n`);
    } finally {
      conn.close();
    }
  });

withPointOptions(withConnectOptions(program.command('drill').description('restore a point to a scratch directory, run a check against each disk image, clean up')))
  .requiredOption('--check <command>', 'shell command run per disk, {image} replaced by the image path, e.g. "e2fsck -fn {image}"; exit 0 = pass')
  .option('--disk <name>', 'check only this disk (default: every disk of the point)')
  .option('--scratch <dir>', 'directory for the scratch directory (default: the system temp directory)')
  .option('--check-timeout <duration>', 'kill a check still running after this long; it fails', '1h')
  .action(async (opts: ConnectOptions & PointOptions & { check: string; disk?: string; scratch?: string; checkTimeout: string }) => {
    requireHost(opts, 'point to drill');
    checkPointOptions(opts);
    const checkTimeoutMs = parseDurationMs(opts.checkTimeout);
    const { conn, keys } = await connect(opts);
    let result;
    try {
      result = await drillPoint(conn, keys, await selectPoint(conn, opts, opts.disk), { ...opts, checkTimeoutMs });
    } finally {
      conn.close();
    }
    if (opts.json) printJson(result);
    else {
      for (const d of result.disks) {
        process.stdout.write(`${d.passed ? 'PASS' : 'FAIL'} ${printable(d.name)} (${checkOutcome(d)})\n`);
        if (!d.passed && d.output.trim()) process.stdout.write(d.output.trimEnd().replace(/^/gm, '  | ') + '\n');
      }
      process.stdout.write(`drill of point ${result.point} (${result.time}): ${result.passed ? 'passed' : 'FAILED'}\n`);
    }
    if (!result.passed) {
      // Exit 1 with one line, as README's exit-code table says; a restore that fails exits with its own code.
      const failed = result.disks.filter((d) => !d.passed).map((d) => `${printable(d.name)} (${checkOutcome(d)})`);
      process.stderr.write(`${program.name()}: drill failed: check did not pass on ${failed.join(', ')}\n`);
      process.exitCode = 1;
    }
  });

function checkOutcome(d: DrillDiskResult): string {
  return d.timedOut ? 'timed out' : d.exitCode !== null ? `exit ${d.exitCode}` : `killed by ${d.signal}`;
}

withConnectOptions(program.command('verify').description('fetch every chunk of the committed points and check it with the key (--read-data); exit 5 on damage'))
  .option('--read-data', 'fetch and decrypt every chunk (the key-less check is tidemark-receiver verify)')
  .action(async (opts: ConnectOptions & { readData?: boolean }) => {
    if (!opts.readData) throw new TidemarkError('E_USAGE', READ_DATA_REQUIRED);
    const { conn, keys } = await connect(opts);
    try {
      await runRestoreVerify(conn, keys, await listPoints(conn, opts.host ?? null), opts);
    } finally {
      conn.close();
    }
  });

await runCli(program);
