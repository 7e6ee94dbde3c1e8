-- Argo CD health check for selfimprove.dev/SelfImproveRun (Lua 5.1, as Argo CD runs it).
-- Install: the argocd-cm key resource.customizations.health.selfimprove.dev_SelfImproveRun
-- (examples/gitops/argocd/argocd-cm.yaml holds this file's text).
--   Failed=True or Degraded=True      -> Degraded     (a stage failed; Degraded also while retrying)
--   spec changed, not yet observed     -> Progressing  (e.g. rounds.max raised in git)
--   Succeeded=True                     -> Healthy
--   Suspended=True                     -> Suspended    (spec.suspend: true)
--   anything else                      -> Progressing
local hs = {}

local function find_condition(conditions, ctype)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function is_true(conditions, ctype)
  local c = find_condition(conditions, ctype)
  return c ~= nil and c.status == "True", c
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local text = c.message
  if text == nil or text == "" then
    text = c.reason
  end
  if text == nil or text == "" then
    return fallback
  end
  return text
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the run"
  return hs
end

local conditions = status.conditions
local failed, failed_c = is_true(conditions, "Failed")
if failed then
  hs.status = "Degraded"
  hs.message = describe(failed_c, "Run failed")
  return hs
end

local degraded, degraded_c = is_true(conditions, "Degraded")
if degraded then
  hs.status = "Degraded"
  hs.message = describe(degraded_c, "Run degraded")
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local succeeded, succeeded_c = is_true(conditions, "Succeeded")
if succeeded then
  hs.status = "Healthy"
  hs.message = describe(succeeded_c, "Run succeeded")
  if status.bestAdapter ~= nil and status.bestAdapter ~= "" then
    hs.message = hs.message .. "; best adapter " .. status.bestAdapter
  end
  return hs
end

local suspended, suspended_c = is_true(conditions, "Suspended")
if suspended then
  hs.status = "Suspended"
  hs.message = describe(suspended_c, "Run suspended")
  return hs
end

hs.status = "Progressing"
local progressing_c = find_condition(conditions, "Progressing")
local fallback = "Phase " .. tostring(status.phase or "Pending")
if status.round ~= nil then
  fallback = fallback .. ", round " .. tostring(status.round)
end
hs.message = describe(progressing_c, fallback)
return hs
