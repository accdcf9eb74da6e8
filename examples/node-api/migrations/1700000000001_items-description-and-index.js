'use strict';

/**
 * 2: optional description + index used by GET /items (newest first).
 *
 * @param {import('node-pg-migrate').MigrationBuilder} pgm
 */
exports.up = (pgm) => {
  pgm.addColumn('items', {
    description: { type: 'text' },
  });
  pgm.createIndex('items', 'created_at', { name: 'items_created_at_idx' });
};

/** @param {import('node-pg-migrate').MigrationBuilder} pgm */
exports.down = (pgm) => {
  pgm.dropIndex('items', 'created_at', { name: 'items_created_at_idx' });
  pgm.dropColumn('items', 'description');
};
