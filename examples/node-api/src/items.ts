import type { Pool } from 'pg';

export interface Item {
  id: number;
  name: string;
  description: string | null;
  created_at: string;
}

export interface NewItem {
  name: string;
  description: string | null;
}

export interface ItemsRepository {
  list(limit: number): Promise<Item[]>;
  get(id: number): Promise<Item | undefined>;
  create(item: NewItem): Promise<Item>;
}

export const NAME_MAX_LENGTH = 200;
export const DESCRIPTION_MAX_LENGTH = 2000;
export const DEFAULT_LIST_LIMIT = 20;
export const MAX_LIST_LIMIT = 100;

export type Validation<T> = { ok: true; value: T } | { ok: false; errors: string[] };

/** Validates a POST /items body: {name: string, description?: string | null}. */
export function validateNewItem(body: unknown): Validation<NewItem> {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    return { ok: false, errors: ['request body must be a JSON object (Content-Type: application/json)'] };
  }
  const input = body as Record<string, unknown>;
  const errors: string[] = [];

  const unknownFields = Object.keys(input).filter((k) => k !== 'name' && k !== 'description');
  if (unknownFields.length > 0) errors.push(`unknown field(s): ${unknownFields.join(', ')}`);

  let name = '';
  if (input.name === undefined) errors.push('name is required');
  else if (typeof input.name !== 'string') errors.push('name must be a string');
  else {
    name = input.name.trim();
    if (name === '') errors.push('name must not be empty');
    else if (name.length > NAME_MAX_LENGTH) errors.push(`name must be at most ${NAME_MAX_LENGTH} characters`);
  }

  let description: string | null = null;
  if (input.description !== undefined && input.description !== null) {
    if (typeof input.description !== 'string') errors.push('description must be a string');
    else if (input.description.length > DESCRIPTION_MAX_LENGTH) {
      errors.push(`description must be at most ${DESCRIPTION_MAX_LENGTH} characters`);
    } else description = input.description;
  }

  return errors.length > 0 ? { ok: false, errors } : { ok: true, value: { name, description } };
}

/** ?limit=N -> 1..MAX_LIST_LIMIT (default DEFAULT_LIST_LIMIT). */
export function parseLimit(raw: unknown): Validation<number> {
  if (raw === undefined) return { ok: true, value: DEFAULT_LIST_LIMIT };
  if (typeof raw !== 'string' || !/^\d+$/.test(raw)) {
    return { ok: false, errors: [`limit must be an integer between 1 and ${MAX_LIST_LIMIT}`] };
  }
  const value = Number(raw);
  if (value < 1 || value > MAX_LIST_LIMIT) {
    return { ok: false, errors: [`limit must be an integer between 1 and ${MAX_LIST_LIMIT}`] };
  }
  return { ok: true, value };
}

/** Path parameter :id -> positive safe integer. */
export function parseId(raw: unknown): Validation<number> {
  if (typeof raw !== 'string' || !/^[1-9]\d*$/.test(raw) || !Number.isSafeInteger(Number(raw))) {
    return { ok: false, errors: ['id must be a positive integer'] };
  }
  return { ok: true, value: Number(raw) };
}

interface ItemRow {
  id: string | number;
  name: string;
  description: string | null;
  created_at: Date | string;
}

function toItem(row: ItemRow): Item {
  return {
    id: Number(row.id),
    name: row.name,
    description: row.description,
    created_at: row.created_at instanceof Date ? row.created_at.toISOString() : String(row.created_at),
  };
}

/** PostgreSQL implementation backed by the `items` table (see migrations/). */
export function pgItemsRepository(pool: Pool): ItemsRepository {
  return {
    async list(limit) {
      const { rows } = await pool.query<ItemRow>(
        'SELECT id, name, description, created_at FROM items ORDER BY created_at DESC, id DESC LIMIT $1',
        [limit],
      );
      return rows.map(toItem);
    },
    async get(id) {
      const { rows } = await pool.query<ItemRow>(
        'SELECT id, name, description, created_at FROM items WHERE id = $1',
        [id],
      );
      return rows.length > 0 ? toItem(rows[0]) : undefined;
    },
    async create(item) {
      const { rows } = await pool.query<ItemRow>(
        'INSERT INTO items (name, description) VALUES ($1, $2) RETURNING id, name, description, created_at',
        [item.name, item.description],
      );
      return toItem(rows[0]);
    },
  };
}
