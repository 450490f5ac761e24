-- A node CDR line saying "not answered" for a call the database holds answered is, most
-- often, the line of a device that did not pick up a call another one answered: the answered
-- line, read later, settles the call. It used to be dropped. When no answered line follows
-- (the caller left between the callee's answer and the bridge), the call was then released
-- when its lease lapsed and billed up to its grant for talk that never happened. The line is
-- now kept with the call: the release settles the call from it, unanswered and unbilled.
ALTER TABLE calls ADD COLUMN node_unanswered jsonb;
