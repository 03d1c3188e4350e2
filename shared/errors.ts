// One error type for the whole product. Callers branch on `code` (stable,
// documented in docs/SPEC.md §9) and on `retryable`; the CLI maps `code` to
// an exit status so scripts can tell the cases apart.
import { resolve, sep } from 'node:path';

export const ErrorCodes = {
  USAGE: 'E_USAGE',
  PASSPHRASE: 'E_PASSPHRASE',
  KEY_FILE: 'E_KEY_FILE',
  UNREACHABLE: 'E_UNREACHABLE',
  FINGERPRINT: 'E_FINGERPRINT',
  AUTH: 'E_AUTH',
  FORBIDDEN: 'E_FORBIDDEN',
  PROTOCOL: 'E_PROTOCOL',
  INTEGRITY: 'E_INTEGRITY',
  NOT_FOUND: 'E_NOT_FOUND',
  CONFLICT: 'E_CONFLICT',
  STORAGE: 'E_STORAGE',
  DISK: 'E_DISK',
  STATE: 'E_STATE',
  INTERNAL: 'E_INTERNAL',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

/** Exit status per code; README "Exit codes" documents the same table. */
export const exitCodes: Record<ErrorCode, number> = {
  E_INTERNAL: 1,
  E_USAGE: 2,
  E_PASSPHRASE: 3,
  E_KEY_FILE: 3,
  E_UNREACHABLE: 4,
  E_INTEGRITY: 5,
  E_AUTH: 6,
  E_FORBIDDEN: 6,
  E_FINGERPRINT: 7,
  E_PROTOCOL: 8,
  E_NOT_FOUND: 9,
  E_CONFLICT: 10,
  E_STORAGE: 11,
  E_DISK: 12,
  E_STATE: 13,
};

const retryableCodes = new Set<ErrorCode>(['E_UNREACHABLE', 'E_STORAGE']);

export class TidemarkError extends Error {
  readonly code: ErrorCode;
  readonly retryable: boolean;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; retryable?: boolean }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'TidemarkError';
    this.code = code;
    this.retryable = options?.retryable ?? retryableCodes.has(code);
  }

  get exitCode(): number {
    return exitCodes[this.code];
  }
}

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === 'string' && Object.hasOwn(exitCodes, value); // not `in`: a receiver could send 'toString'
}

export interface ErrorContext {
  /**
   * Whose storage a full-disk or I/O error hit, for the message: `receiver` names the
   * receiver's data directory (its replies carry the message to agents); default: this host.
   */
  storage?: 'receiver';
  /**
   * The agent's state directory: its only writes on this host (clones of images fail softly),
   * so a full disk or I/O error not about another path is that directory's, and the message names it.
   */
  stateDir?: string;
}

/** A full filesystem: ENOSPC/EDQUOT from the kernel, SQLITE_FULL from the catalog (better-sqlite3 `code`). */
const fullCodes = new Set(['ENOSPC', 'EDQUOT', 'SQLITE_FULL']);

/**
 * A file or device of this host that cannot be written or read: read-only, not permitted,
 * a path through a file, past a size limit, a device gone or failing. Not mapped for the
 * receiver, whose unexpected errors must stay E_INTERNAL (logged there), and whose replies
 * would make an agent blame its own disk.
 */
const localDiskCodes = new Set(['EROFS', 'EPERM', 'ENOTDIR', 'EFBIG', 'ENXIO', 'EIO']);

/**
 * Wraps anything thrown into a TidemarkError, keeping the original as cause. The one
 * place that maps system and SQLite codes: a full disk and catalog I/O errors become
 * E_STORAGE (retryable), with a message that says whose disk and what to do.
 */
export function asTidemarkError(err: unknown, context: ErrorContext = {}): TidemarkError {
  if (err instanceof TidemarkError) return err;
  const message = err instanceof Error ? err.message : String(err);
  const sysCode = (err as NodeJS.ErrnoException | undefined)?.code;
  if (typeof sysCode === 'string' && (fullCodes.has(sysCode) || sysCode.startsWith('SQLITE_IOERR'))) {
    const detail = message.startsWith(sysCode) ? message : `${sysCode}: ${message}`;
    const where = context.storage === 'receiver' ? 'receiver'
      : context.stateDir !== undefined && concerns(err, context.stateDir) ? { stateDir: context.stateDir }
      : 'local';
    return new TidemarkError('E_STORAGE', storageMessage(fullCodes.has(sysCode), detail, where), { cause: err });
  }
  if (sysCode === 'ENOENT' || sysCode === 'EACCES' || sysCode === 'EISDIR' || (context.storage !== 'receiver' && localDiskCodes.has(sysCode ?? ''))) {
    return new TidemarkError('E_DISK', message, { cause: err, retryable: false });
  }
  return new TidemarkError('E_INTERNAL', message, { cause: err });
}

/** What a full disk (`full`) or a storage I/O error means, for whose storage, and what to do. */
function storageMessage(full: boolean, detail: string, where: 'receiver' | 'local' | { stateDir: string }): string {
  if (where === 'receiver') {
    return full
      ? `receiver disk full: no space left in the receiver's data directory (${detail}); ` +
        'free space on that filesystem or run tidemark-receiver prune; replication pauses and resumes by itself once there is room'
      : `receiver storage I/O error (${detail}); check the disk of the receiver's data directory (free space, kernel log); the request can be retried`;
  }
  if (where !== 'local') {
    return full
      ? `this host's disk is full: no space left for the agent state directory ${where.stateDir} (${detail}); free space on that filesystem and retry`
      : `storage I/O error in the agent state directory ${where.stateDir} on this host (${detail}); check that filesystem (free space, kernel log) and retry`;
  }
  return full
    ? `disk full: no space left on device (${detail}); free space on that filesystem and retry`
    : `storage I/O error (${detail}); check the disk (free space, kernel log) and retry`;
}

/** Whether a system error is about `dir`: it names a path there, or none (a write or fsync of an open file; SQLite). */
function concerns(err: unknown, dir: string): boolean {
  const { path, dest } = err as { path?: unknown; dest?: unknown };
  const named = [path, dest].filter((p): p is string => typeof p === 'string');
  const root = resolve(dir);
  return named.length === 0 || named.some((p) => resolve(p) === root || resolve(p).startsWith(root + sep));
}

/**
 * What is wrong with a settings file, in one line: a ZodError's message is a multi-line
 * JSON list of issues, so its first issue as "key: problem"; else the first line.
 */
export function settingsProblem(err: unknown): string {
  const issues = (err as { issues?: Array<{ path: Array<string | number>; message: string }> }).issues;
  const issue = Array.isArray(issues) ? issues[0] : undefined;
  if (issue) return `${issue.path.length > 0 ? `${issue.path.join('.')}: ` : ''}${issue.message}`;
  return (err instanceof Error ? err.message : String(err)).split('\n')[0]!;
}
