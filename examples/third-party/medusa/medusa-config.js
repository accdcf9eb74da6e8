// Medusa's configuration, in the shape of the official v1 starter's (medusa-starter-default): every setting comes
// from the environment the release gives the app. No plugins and no modules configured: the defaults are the
// local event bus and the in-memory cache (@medusajs/event-bus-local, @medusajs/cache-inmemory, both in
// package.json). With REDIS_URL, Medusa keeps its sessions in Redis, so a login holds across instances.
module.exports = {
  projectConfig: {
    database_url: process.env.DATABASE_URL,
    database_type: "postgres",
    jwt_secret: process.env.JWT_SECRET,
    cookie_secret: process.env.COOKIE_SECRET,
    store_cors: process.env.STORE_CORS,
    admin_cors: process.env.ADMIN_CORS,
    ...(process.env.REDIS_URL ? { redis_url: process.env.REDIS_URL } : {}),
  },
  plugins: [],
  modules: {},
};
