#!/usr/bin/env bash
# Create (or reconcile) apexrank's Kafka topics with production partitions, replication and retention,
# using kafka-topics.sh / kafka-configs.sh from the Apache Kafka distribution. Idempotent: topics that
# exist are left in place (--if-not-exists) and only their retention/cleanup configs are brought in line.
#
#   APEXRANK_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 deploy/topics.sh
#
# Topic names, partitions and replication factor are read from the same APEXRANK_* variables the
# services read (ranker/settings.py, TopicSettings), with the same defaults, so one env file drives both.
#
# Environment (all optional):
#   APEXRANK_KAFKA__BOOTSTRAP_SERVERS           brokers (default localhost:9092)
#   APEXRANK_KAFKA__TOPICS__SONGS_GENERATED     topic names (defaults as in TopicSettings)
#   APEXRANK_KAFKA__TOPICS__SONGS_SCORED
#   APEXRANK_KAFKA__TOPICS__DEAD_LETTER
#   APEXRANK_KAFKA__TOPICS__ENGAGEMENT
#   APEXRANK_KAFKA__TOPICS__ENGAGEMENT_DEAD_LETTER
#   APEXRANK_KAFKA__TOPICS__MODELS_PROMOTED
#   APEXRANK_KAFKA__TOPICS__SONGS_DELETED
#   APEXRANK_KAFKA__TOPICS__FEEDS_SERVED
#   APEXRANK_KAFKA__TOPICS__SONGS_RETRY         default: songs.generated's name + .retry
#   APEXRANK_KAFKA__TOPICS__PARTITIONS          partitions of every topic (default 3); the worker
#                                               scales out to at most this many replicas
#   APEXRANK_KAFKA__TOPICS__REPLICATION_FACTOR  replication factor (default 1; use 3 in production)
#   SONGS_GENERATED_PARTITIONS                  override the partitions of songs.generated (and of its
#                                               retry topic, which the same workers share) only
#   MODELS_PROMOTED_PARTITIONS                  partitions of models.promoted (default 1: promotions
#                                               keep one total order)
#   MIN_INSYNC_REPLICAS                         default: replication factor - 1 (at least 1)
#   SONGS_GENERATED_RETENTION_MS                default 604800000 (7 days), songs.generated and its retry topic
#   ENGAGEMENT_RETENTION_MS                     default 604800000 (7 days), engagement and feeds.served
#   DEAD_LETTER_RETENTION_MS                    default 2592000000 (30 days), both dead-letter topics
#   COMPACTED_MIN_LAG_MS                        min.compaction.lag.ms of the compacted topics (default 1 hour)
#   KAFKA_BIN                                   folder holding kafka-topics.sh (default /opt/kafka/bin,
#                                               else found on PATH)
#   KAFKA_COMMAND_CONFIG                        client properties file for SSL/SASL brokers
#   RECONCILE_CONFIGS                           1 (default) also alters configs of existing topics; 0 skips
#   WAIT_TIMEOUT_S                              how long to wait for the brokers to answer (default 120)
set -euo pipefail

BOOTSTRAP="${APEXRANK_KAFKA__BOOTSTRAP_SERVERS:-localhost:9092}"
PARTITIONS="${APEXRANK_KAFKA__TOPICS__PARTITIONS:-3}"
REPLICATION="${APEXRANK_KAFKA__TOPICS__REPLICATION_FACTOR:-1}"
SONGS_GENERATED_PARTITIONS="${SONGS_GENERATED_PARTITIONS:-${PARTITIONS}}"
MODELS_PROMOTED_PARTITIONS="${MODELS_PROMOTED_PARTITIONS:-1}"
if [[ -z "${MIN_INSYNC_REPLICAS:-}" ]]; then
  MIN_INSYNC_REPLICAS=$((REPLICATION > 1 ? REPLICATION - 1 : 1))
fi
SONGS_GENERATED_RETENTION_MS="${SONGS_GENERATED_RETENTION_MS:-604800000}"
ENGAGEMENT_RETENTION_MS="${ENGAGEMENT_RETENTION_MS:-604800000}"
DEAD_LETTER_RETENTION_MS="${DEAD_LETTER_RETENTION_MS:-2592000000}"
COMPACTED_MIN_LAG_MS="${COMPACTED_MIN_LAG_MS:-3600000}"
RECONCILE_CONFIGS="${RECONCILE_CONFIGS:-1}"
WAIT_TIMEOUT_S="${WAIT_TIMEOUT_S:-120}"

TOPIC_SONGS_GENERATED="${APEXRANK_KAFKA__TOPICS__SONGS_GENERATED:-songs.generated}"
TOPIC_SONGS_SCORED="${APEXRANK_KAFKA__TOPICS__SONGS_SCORED:-songs.scored}"
TOPIC_DEAD_LETTER="${APEXRANK_KAFKA__TOPICS__DEAD_LETTER:-songs.dead-letter}"
TOPIC_ENGAGEMENT="${APEXRANK_KAFKA__TOPICS__ENGAGEMENT:-engagement}"
TOPIC_ENGAGEMENT_DEAD_LETTER="${APEXRANK_KAFKA__TOPICS__ENGAGEMENT_DEAD_LETTER:-engagement.dead-letter}"
TOPIC_MODELS_PROMOTED="${APEXRANK_KAFKA__TOPICS__MODELS_PROMOTED:-models.promoted}"
TOPIC_SONGS_DELETED="${APEXRANK_KAFKA__TOPICS__SONGS_DELETED:-songs.deleted}"
TOPIC_FEEDS_SERVED="${APEXRANK_KAFKA__TOPICS__FEEDS_SERVED:-feeds.served}"
TOPIC_SONGS_RETRY="${APEXRANK_KAFKA__TOPICS__SONGS_RETRY:-${TOPIC_SONGS_GENERATED}.retry}"

log() { printf 'topics.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

find_tool() {
  local name="$1" bin_dir="${KAFKA_BIN:-/opt/kafka/bin}"
  if [[ -x "${bin_dir}/${name}" ]]; then
    printf '%s\n' "${bin_dir}/${name}"
  elif command -v "${name}" >/dev/null 2>&1; then
    command -v "${name}"
  else
    die "${name} not found in ${bin_dir} or on PATH (set KAFKA_BIN to the Kafka distribution's bin folder)"
  fi
}

for value in "${PARTITIONS}" "${SONGS_GENERATED_PARTITIONS}" "${MODELS_PROMOTED_PARTITIONS}" "${REPLICATION}" "${MIN_INSYNC_REPLICAS}"; do
  [[ "${value}" =~ ^[1-9][0-9]*$ ]] || die "partitions, replication factor and min.insync.replicas must be positive integers (got '${value}')"
done
((MIN_INSYNC_REPLICAS <= REPLICATION)) || die "MIN_INSYNC_REPLICAS=${MIN_INSYNC_REPLICAS} exceeds the replication factor ${REPLICATION}"

KAFKA_TOPICS="$(find_tool kafka-topics.sh)"
KAFKA_CONFIGS="$(find_tool kafka-configs.sh)"
CLIENT_ARGS=(--bootstrap-server "${BOOTSTRAP}")
if [[ -n "${KAFKA_COMMAND_CONFIG:-}" ]]; then
  [[ -r "${KAFKA_COMMAND_CONFIG}" ]] || die "KAFKA_COMMAND_CONFIG=${KAFKA_COMMAND_CONFIG} is not a readable file"
  CLIENT_ARGS+=(--command-config "${KAFKA_COMMAND_CONFIG}")
fi

wait_for_brokers() {
  local deadline=$((SECONDS + WAIT_TIMEOUT_S))
  until "${KAFKA_TOPICS}" "${CLIENT_ARGS[@]}" --list >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "no answer from ${BOOTSTRAP} within ${WAIT_TIMEOUT_S}s"
    log "waiting for ${BOOTSTRAP}..."
    sleep 3
  done
}

# ensure_topic NAME PARTITIONS CONFIGS: CONFIGS is a comma-separated list of key=value topic configs.
ensure_topic() {
  local name="$1" partitions="$2" configs="$3" config_args=() item
  local -a items
  IFS=',' read -r -a items <<<"${configs}"
  for item in "${items[@]}"; do
    config_args+=(--config "${item}")
  done
  log "ensuring ${name} (partitions=${partitions}, replication=${REPLICATION}, ${configs})"
  "${KAFKA_TOPICS}" "${CLIENT_ARGS[@]}" --create --if-not-exists --topic "${name}" \
    --partitions "${partitions}" --replication-factor "${REPLICATION}" "${config_args[@]}"
  if [[ "${RECONCILE_CONFIGS}" == "1" ]]; then
    # --if-not-exists leaves an existing topic's configs alone: bring them in line (idempotent).
    "${KAFKA_CONFIGS}" "${CLIENT_ARGS[@]}" --alter --entity-type topics --entity-name "${name}" \
      --add-config "${configs}"
  fi
}

wait_for_brokers

ISR="min.insync.replicas=${MIN_INSYNC_REPLICAS}"
DELETE="cleanup.policy=delete,${ISR}"
COMPACT="cleanup.policy=compact,min.compaction.lag.ms=${COMPACTED_MIN_LAG_MS},${ISR}"

# New songs to score: replayable for a week.
ensure_topic "${TOPIC_SONGS_GENERATED}" "${SONGS_GENERATED_PARTITIONS}" "${DELETE},retention.ms=${SONGS_GENERATED_RETENTION_MS}"
# Songs whose audio fetch failed transiently, waiting for their next try: as long as the songs themselves.
ensure_topic "${TOPIC_SONGS_RETRY}" "${SONGS_GENERATED_PARTITIONS}" "${DELETE},retention.ms=${SONGS_GENERATED_RETENTION_MS}"
# Scores, keyed by song_id and consumed as upserts: compacted keeps the latest score per song.
ensure_topic "${TOPIC_SONGS_SCORED}" "${PARTITIONS}" "${COMPACT}"
# Dead letters: kept a month for inspection and replay.
ensure_topic "${TOPIC_DEAD_LETTER}" "${PARTITIONS}" "${DELETE},retention.ms=${DEAD_LETTER_RETENTION_MS}"
# Engagement events that feed retraining: a week.
ensure_topic "${TOPIC_ENGAGEMENT}" "${PARTITIONS}" "${DELETE},retention.ms=${ENGAGEMENT_RETENTION_MS}"
# What the API served (the exposures engagement joins to): as long as the engagement it explains.
ensure_topic "${TOPIC_FEEDS_SERVED}" "${PARTITIONS}" "${DELETE},retention.ms=${ENGAGEMENT_RETENTION_MS}"
ensure_topic "${TOPIC_ENGAGEMENT_DEAD_LETTER}" "${PARTITIONS}" "${DELETE},retention.ms=${DEAD_LETTER_RETENTION_MS}"
# Model promotions: compacted, the latest promotion is what matters.
ensure_topic "${TOPIC_MODELS_PROMOTED}" "${MODELS_PROMOTED_PARTITIONS}" "${COMPACT}"
# Takedowns, keyed by song_id: compacted keeps one per song for good, so an index shard restored from an
# old backup can apply every takedown again.
ensure_topic "${TOPIC_SONGS_DELETED}" "${PARTITIONS}" "${COMPACT}"

log "done: ${TOPIC_SONGS_GENERATED}, ${TOPIC_SONGS_SCORED}, ${TOPIC_DEAD_LETTER}, ${TOPIC_ENGAGEMENT}, ${TOPIC_ENGAGEMENT_DEAD_LETTER}, ${TOPIC_MODELS_PROMOTED}, ${TOPIC_SONGS_DELETED}, ${TOPIC_SONGS_RETRY}, ${TOPIC_FEEDS_SERVED}"
