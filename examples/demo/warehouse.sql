CREATE SCHEMA analytics;
-- Members of Kubit cohort 4711: every third demo user, and some who are not in Braze.
CREATE TABLE analytics.cohort_4711_members (user_id text);
INSERT INTO analytics.cohort_4711_members
  SELECT 'user-' || lpad(i::text, 4, '0') FROM generate_series(3, 240, 3) AS i;
-- Behind examples/snowflake-daily.yaml (through the Snowflake stand-in): trial users with
-- a conversion score.
CREATE TABLE analytics.trial_conversions (user_id text, score numeric(5,2));
INSERT INTO analytics.trial_conversions
  SELECT 'user-' || lpad(i::text, 4, '0'), (i % 10) / 10.0 FROM generate_series(1, 60) AS i;
-- Behind examples/databricks-weekly.yaml (through the Databricks stand-in).
CREATE TABLE analytics.weekly_engaged (user_id text, sessions int);
INSERT INTO analytics.weekly_engaged
  SELECT 'user-' || lpad(i::text, 4, '0'), i % 7 FROM generate_series(100, 180) AS i;
-- BigQuery's `cohorts.engaged_readers` (examples/bigquery-daily.yaml): the demo's BigQuery
-- stand-in runs the query here. Every fourth demo user, with a session count.
CREATE SCHEMA cohorts;
CREATE TABLE cohorts.engaged_readers (user_id text, sessions_30d bigint);
INSERT INTO cohorts.engaged_readers
  SELECT 'user-' || lpad(i::text, 4, '0'), i % 9 FROM generate_series(4, 200, 4) AS i;
