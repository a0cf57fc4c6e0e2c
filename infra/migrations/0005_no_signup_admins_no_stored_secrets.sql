-- Admin rights come from an operator (`taskforge admin grant`) or TASKFORGE_ADMIN_USER_IDS,
-- never from a signup: flags set by the old signup rule (an email listed in a setting)
-- are withdrawn. Operators re-grant the real administrators after upgrading.
UPDATE users SET is_admin = false WHERE is_admin;
COMMENT ON COLUMN users.is_admin IS 'granted by an operator (taskforge admin grant), never by a signup';

-- Secrets never stay in storage: API keys that dead-lettered submissions carried in their
-- `apikey` extension, and the copies replay put into outbox headers.
UPDATE dead_letters SET attributes = attributes - 'apikey' WHERE attributes ? 'apikey';
UPDATE outbox SET headers = headers - 'apikey' WHERE headers ? 'apikey';
