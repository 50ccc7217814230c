-- The raw sink counts the dead-letter topic into deadletter_counts (per minute, per
-- reason) exactly once per Kafka record: the next offset to count of each partition is
-- stored in the same transaction as the counts, so a re-read batch adds nothing.
CREATE TABLE deadletter_offsets (
    kafka_topic      text NOT NULL,
    kafka_partition  integer NOT NULL,
    next_offset      bigint NOT NULL,
    PRIMARY KEY (kafka_topic, kafka_partition)
);
