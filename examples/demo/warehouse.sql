CREATE SCHEMA analytics;
-- Members of Kubit cohort 4711: every third demo user, and some who are not in Braze.
CREATE TABLE analytics.cohort_4711_members (user_id text);
INSERT INTO analytics.cohort_4711_members
  SELECT 'user-' || lpad(i::text, 4, '0') FROM generate_series(3, 240, 3) AS i;
