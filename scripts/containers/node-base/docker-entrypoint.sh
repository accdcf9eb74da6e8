#!/bin/sh
# Entrypoint of the ops-pipeline node base image, same behaviour as the official node images:
# run `node ARGS` when the first argument is an option or not an executable command.
set -e
if [ "${1#-}" != "${1}" ] || [ -z "$(command -v "${1}")" ] || { [ -f "${1}" ] && ! [ -x "${1}" ]; }; then
  set -- node "$@"
fi
exec "$@"
