// One error type for the whole product. Callers branch on `code` (stable,
// documented in docs/SPEC.md §9) and on `retryable`; the CLI maps `code` to
// an exit status so scripts can tell the cases apart.

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
  return typeof value === 'string' && value in exitCodes;
}

/** Wraps anything thrown into a TidemarkError, keeping the original as cause. */
export function asTidemarkError(err: unknown): TidemarkError {
  if (err instanceof TidemarkError) return err;
  const message = err instanceof Error ? err.message : String(err);
  const sysCode = (err as NodeJS.ErrnoException | undefined)?.code;
  if (sysCode === 'ENOSPC') return new TidemarkError('E_STORAGE', `no space left on device: ${message}`, { cause: err });
  if (sysCode === 'ENOENT' || sysCode === 'EACCES' || sysCode === 'EISDIR') {
    return new TidemarkError('E_DISK', message, { cause: err, retryable: false });
  }
  return new TidemarkError('E_INTERNAL', message, { cause: err });
}
