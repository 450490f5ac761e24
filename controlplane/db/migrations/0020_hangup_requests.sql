-- A hang-up asked through the API (DELETE /api/v1/calls/{id}) is kept with its call until
-- the call ends: the NOTIFY that carries it to the node's agent is lost when no agent
-- listens at that moment (restarting, its database connection away), so the agents also
-- look for calls asked to end and hang them up again until their CDRs settle them.
ALTER TABLE calls ADD COLUMN hangup_requested_at timestamptz;
