'use strict';

/**
 * 1: items table.
 * node-pg-migrate runs every migration inside a transaction (and `npm run migrate`
 * passes --single-transaction so a whole batch is all-or-nothing).
 *
 * @param {import('node-pg-migrate').MigrationBuilder} pgm
 */
exports.up = (pgm) => {
  pgm.createTable('items', {
    id: { type: 'bigserial', primaryKey: true },
    name: { type: 'text', notNull: true },
    created_at: { type: 'timestamptz', notNull: true, default: pgm.func('now()') },
  });
};

/** @param {import('node-pg-migrate').MigrationBuilder} pgm */
exports.down = (pgm) => {
  pgm.dropTable('items');
};
