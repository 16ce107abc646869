// Type declarations for parley-client (hand-written; the module is plain JavaScript).

/** Connection state: "closed" is terminal (close(), 4001, 4008, or 4011 with a fixed token). */
export type ConnectionState = "connecting" | "open" | "closed";

/** A constructor compatible with the browser's WebSocket (e.g. the `ws` package in Node). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: any) => any) | null;
  onmessage: ((ev: { data: any }) => any) | null;
  onclose: ((ev: { code: number; reason: string }) => any) | null;
  onerror: ((ev: any) => any) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ParleyOptions {
  /** A JWT, or a function called on every (re)connect and refresh that returns one. */
  token?: string | (() => string | Promise<string>);
  /** Anonymous mode (development servers): the user id, sent as `?user=`. */
  user?: string;
  /** Anonymous mode: display name, sent as `?name=`. */
  name?: string;
  /** WebSocket implementation; defaults to `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor | (new (url: string) => any);
  /** First reconnect delay (doubled per attempt, with jitter). Default 500. */
  backoffBaseMs?: number;
  /** Longest reconnect delay. Default 30000. */
  backoffMaxMs?: number;
  /** How long a connection may take to be authenticated. Default 10000. */
  connectTimeoutMs?: number;
  /** At most one `typing` notice per room this often. Default 2000. */
  typingIntervalMs?: number;
  /** Page size when catching up after a truncated resume (at most 200). Default 200. */
  historyPageLimit?: number;
  /** Wait before retrying a request refused with `unavailable`. Default 1000. */
  retryUnavailableMs?: number;
}

/** The server's limits, from `authenticated.limits` (protocol 1.1; null on older servers). */
export interface Limits {
  max_content_bytes: number;
  max_rooms_per_connection: number;
  send_rate: number;
  send_burst: number;
  join_rate: number;
  join_burst: number;
  [key: string]: number;
}

export interface User {
  user_id: string;
  name: string;
}

export interface AuthenticatedInfo extends User {
  limits: Limits | null;
  /** Token expiry (unix seconds), when known. */
  exp: number | null;
}

export interface ChatMessage {
  type: "message";
  room: string;
  seq: number;
  user: string;
  name: string;
  content: string;
  ts: string;
  id?: string;
}

export interface SystemEvent {
  type: "system";
  room: string;
  seq: number;
  event: "join" | "leave";
  user: string;
  /** Display name, as on messages (absent from events stored before protocol 1.1). */
  name?: string;
  content: string;
  ts: string;
}

export type RoomEvent = ChatMessage | SystemEvent;

/** Answer frames the client consumes itself (they resolve its promises); exported for apps
 * that read raw frames. Every answer echoes the request's `id`. */
export interface AckFrame {
  type: "ack";
  room: string;
  seq: number;
  id?: string;
  /** A resend of a stored message: `seq` is the original one. */
  duplicate?: boolean;
}

export interface PongFrame {
  type: "pong";
  id?: string;
}

export interface RefreshedFrame {
  type: "refreshed";
  /** The new token's expiry, unix seconds. */
  exp?: number;
  id?: string;
}

export interface TypingEvent {
  room: string;
  user: string;
  /** Display name as last seen on a message (else the user id). */
  name: string;
}

export interface PresenceInfo {
  /** How many people are in the room. */
  count: number;
  /** False in large rooms, where the server gives only a count. */
  complete: boolean;
}

export interface ResetInfo {
  room: string;
  /** The room's epoch now. */
  epoch: string;
  previousEpoch: string | null;
  recovered: false;
  /** The room's latest seq. */
  seq: number;
}

export interface LeftInfo {
  room: string;
  /** Why the server took the connection out of the room, e.g. "forbidden". */
  reason: string | null;
}

export interface JoinedInfo {
  room: string;
  seq: number;
  epoch: string;
  users: string[] | null;
  user_count: number;
  history: RoomEvent[];
  truncated: boolean;
  recovered?: boolean;
  /** Who may post: "api" when only the server's HTTP API posts (a send fails with "forbidden"). */
  publish: "members" | "api";
  /** False when joins and leaves are not announced as system events. */
  announce: boolean;
  /** False when the room shows no member list (`users` is null). */
  presence: boolean;
  /** False when the room takes no typing notices (`typing()` sends nothing). */
  typing: boolean;
}

export interface SendResult {
  seq: number;
  id: string;
  room: string;
  /** True when the server had already stored this id (a resend after a reconnect). */
  duplicate: boolean;
}

export interface HistoryQuery {
  before?: number;
  after?: number;
  /** 1 to 200; the server's default is 50. */
  limit?: number;
}

export interface HistoryPage {
  messages: RoomEvent[];
  more: boolean;
}

/** Every rejection and `error` event is one of these; `code` is the protocol's error code
 * (`forbidden`, `too_large`, `rate_limited`, `id_conflict`, ...) or one of the client's own:
 * `closed`, `left`, `disconnected`, `token`, `connect`, `token_expired`. */
export class ParleyError extends Error {
  constructor(code: string, message?: string, extra?: object);
  code: string;
  /** The WebSocket close code, for errors that ended the connection. */
  closeCode?: number;
  room?: string;
  id?: string;
  retryAfterMs?: number;
}

type Unsubscribe = () => void;

export interface ClientEvents {
  state: (state: ConnectionState) => void;
  error: (error: ParleyError) => void;
  authenticated: (info: AuthenticatedInfo) => void;
}

export interface RoomEvents {
  message: (message: ChatMessage) => void;
  system: (event: SystemEvent) => void;
  typing: (event: TypingEvent) => void;
  presence: (users: string[], info: PresenceInfo) => void;
  reset: (info: ResetInfo) => void;
  left: (info: LeftInfo) => void;
  /** Every `joined`: the first join and each rejoin after a reconnect. */
  joined: (info: JoinedInfo) => void;
}

export class Room {
  readonly client: Parley;
  readonly name: string;
  /** Joined on the current connection. */
  readonly joined: boolean;
  /** The current member list (user ids, sorted). */
  readonly members: string[];
  readonly userCount: number;
  /** Unacknowledged sends. */
  readonly pending: number;
  /** The room's epoch and the last seq delivered to the listeners. */
  readonly epoch: string | null;
  readonly seq: number;

  on<E extends keyof RoomEvents>(event: E, listener: RoomEvents[E]): Unsubscribe;
  once<E extends keyof RoomEvents>(event: E, listener: RoomEvents[E]): Unsubscribe;
  off<E extends keyof RoomEvents>(event: E, listener: RoomEvents[E]): this;

  /** Joins, and stays joined across reconnects. */
  join(): Promise<JoinedInfo>;
  /** Resolves once stored; kept and resent with the same id across reconnects until acked. */
  send(content: string): Promise<SendResult>;
  history(query?: HistoryQuery): Promise<HistoryPage>;
  /** Sends a typing notice unless one went out less than `typingIntervalMs` ago. */
  typing(): boolean;
  leave(): Promise<{ room: string }>;
}

export class Parley {
  constructor(url: string, options?: ParleyOptions);
  readonly url: string;
  readonly state: ConnectionState;
  readonly user: User | null;
  readonly limits: Limits | null;
  readonly exp: number | null;

  on<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): Unsubscribe;
  once<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): Unsubscribe;
  off<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): this;

  /** The room object for `name` (the same object every time). */
  room(name: string): Room;
  /** A user's display name as last seen on a message (or the user id). */
  displayName(userId: string): string;
  /** Skips the backoff wait: drops the current socket, if any, and connects now. */
  reconnect(): void;
  /** Closes for good; pending requests are rejected with code "closed". */
  close(): void;
}

export default Parley;
