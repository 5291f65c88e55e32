"""What the deploy and preview jobs may do at AWS and Cloudflare, per Pulumi type the program uses.

The policy documents under docs/iam/ are what an admin installs; tests/tools/test_iam_policies.py
plans every example stack (and the optional features they leave off) on the mock engine and checks
that every resource type and data source there is mapped here, that the deploy policy allows every
mapped action, and that the preview policy denies the backup objects and the stack's parameters.
A new resource type without a row here fails that test.

The actions are those the AWS provider (Terraform's, under pulumi-aws) calls to create, read, update,
tag and delete each type; read actions are listed so `pulumi refresh` works too.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IAM_DIR = ROOT / "docs" / "iam"

_EC2_TAGS = ("ec2:CreateTags", "ec2:DeleteTags", "ec2:DescribeTags")
_S3_BUCKET_READ = (
    "s3:ListBucket", "s3:GetBucketLocation", "s3:GetBucketAcl", "s3:GetBucketCORS", "s3:GetBucketWebsite",
    "s3:GetBucketVersioning", "s3:GetAccelerateConfiguration", "s3:GetBucketRequestPayment",
    "s3:GetBucketLogging", "s3:GetLifecycleConfiguration", "s3:GetReplicationConfiguration",
    "s3:GetEncryptionConfiguration", "s3:GetBucketObjectLockConfiguration", "s3:GetBucketTagging",
    "s3:GetBucketPolicy", "s3:GetBucketOwnershipControls", "s3:GetBucketPublicAccessBlock",
)

_SES_TAGS = ("ses:TagResource", "ses:UntagResource", "ses:ListTagsForResource")
_ELB_TAGS = ("elasticloadbalancing:AddTags", "elasticloadbalancing:RemoveTags", "elasticloadbalancing:DescribeTags")
_RDS_TAGS = ("rds:AddTagsToResource", "rds:RemoveTagsFromResource", "rds:ListTagsForResource")
# The first load balancer, Auto Scaling group or RDS instance of an account creates the service's
# service-linked role (AWSServiceRoleForElasticLoadBalancing, ...ForAutoScaling, ...ForRDS).
_SERVICE_LINKED_ROLE = ("iam:CreateServiceLinkedRole",)
_ELASTICACHE_TAGS = ("elasticache:AddTagsToResource", "elasticache:RemoveTagsFromResource",
                     "elasticache:ListTagsForResource")

# Pulumi resource type or data-source (invoke) token -> the IAM actions a deploy needs for it.
AWS_ACTIONS: dict[str, tuple[str, ...]] = {
    # The provider validates its credentials and looks up the account id.
    "pulumi:providers:aws": ("sts:GetCallerIdentity",),
    # Data sources (also called by `pulumi preview`).
    "aws:index/getCallerIdentity:getCallerIdentity": ("sts:GetCallerIdentity",),
    "aws:index/getAvailabilityZones:getAvailabilityZones": ("ec2:DescribeAvailabilityZones",),
    "aws:ec2/getAmi:getAmi": ("ec2:DescribeImages",),
    "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings": ("ec2:DescribeInstanceTypeOfferings",),
    "aws:ec2/getSubnet:getSubnet": ("ec2:DescribeSubnets",),
    # The permissions boundary (components/boundary.py), before anything is created: the data source reads
    # the policy (GetPolicy) and its default version's document (GetPolicyVersion).
    "aws:iam/getPolicy:getPolicy": ("iam:GetPolicy", "iam:GetPolicyVersion"),
    # Network
    "aws:ec2/vpc:Vpc": (
        "ec2:CreateVpc", "ec2:DeleteVpc", "ec2:DescribeVpcs", "ec2:DescribeVpcAttribute", "ec2:ModifyVpcAttribute",
        "ec2:AssociateVpcCidrBlock", "ec2:DisassociateVpcCidrBlock", "ec2:DescribeNetworkAcls",
        "ec2:DescribeRouteTables", "ec2:DescribeSecurityGroups", *_EC2_TAGS),
    "aws:ec2/subnet:Subnet": (
        "ec2:CreateSubnet", "ec2:DeleteSubnet", "ec2:DescribeSubnets", "ec2:ModifySubnetAttribute",
        "ec2:AssociateSubnetCidrBlock", "ec2:DisassociateSubnetCidrBlock", *_EC2_TAGS),
    "aws:ec2/internetGateway:InternetGateway": (
        "ec2:CreateInternetGateway", "ec2:DeleteInternetGateway", "ec2:AttachInternetGateway",
        "ec2:DetachInternetGateway", "ec2:DescribeInternetGateways", *_EC2_TAGS),
    "aws:ec2/routeTable:RouteTable": (
        "ec2:CreateRouteTable", "ec2:DeleteRouteTable", "ec2:DescribeRouteTables", "ec2:CreateRoute",
        "ec2:ReplaceRoute", "ec2:DeleteRoute", *_EC2_TAGS),
    "aws:ec2/routeTableAssociation:RouteTableAssociation": (
        "ec2:AssociateRouteTable", "ec2:DisassociateRouteTable", "ec2:ReplaceRouteTableAssociation",
        "ec2:DescribeRouteTables"),
    "aws:ec2/securityGroup:SecurityGroup": (
        "ec2:CreateSecurityGroup", "ec2:DeleteSecurityGroup", "ec2:DescribeSecurityGroups",
        "ec2:DescribeSecurityGroupRules", "ec2:AuthorizeSecurityGroupEgress", "ec2:RevokeSecurityGroupEgress",
        "ec2:AuthorizeSecurityGroupIngress", "ec2:RevokeSecurityGroupIngress", "ec2:DescribeNetworkInterfaces",
        *_EC2_TAGS),
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": (
        "ec2:AuthorizeSecurityGroupIngress", "ec2:RevokeSecurityGroupIngress", "ec2:ModifySecurityGroupRules",
        "ec2:DescribeSecurityGroupRules", "ec2:DescribeSecurityGroups", *_EC2_TAGS),
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": (
        "ec2:AuthorizeSecurityGroupEgress", "ec2:RevokeSecurityGroupEgress", "ec2:ModifySecurityGroupRules",
        "ec2:DescribeSecurityGroupRules", "ec2:DescribeSecurityGroups", *_EC2_TAGS),
    "aws:ec2/networkInterface:NetworkInterface": (
        "ec2:CreateNetworkInterface", "ec2:DeleteNetworkInterface", "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeNetworkInterfaceAttribute", "ec2:ModifyNetworkInterfaceAttribute", "ec2:AssignIpv6Addresses",
        "ec2:UnassignIpv6Addresses", "ec2:DetachNetworkInterface", *_EC2_TAGS),
    "aws:ec2/eip:Eip": (
        "ec2:AllocateAddress", "ec2:ReleaseAddress", "ec2:DescribeAddresses", "ec2:DisassociateAddress",
        *_EC2_TAGS),
    "aws:ec2/eipAssociation:EipAssociation": (
        "ec2:AssociateAddress", "ec2:DisassociateAddress", "ec2:DescribeAddresses"),
    "aws:ec2/eipDomainName:EipDomainName": (
        "ec2:ModifyAddressAttribute", "ec2:ResetAddressAttribute", "ec2:DescribeAddressesAttribute"),
    # Hosts
    "aws:ec2/amiCopy:AmiCopy": (
        "ec2:CopyImage", "ec2:DescribeImages", "ec2:DescribeImageAttribute", "ec2:ModifyImageAttribute",
        "ec2:DeregisterImage", "ec2:DescribeSnapshots", "ec2:DeleteSnapshot", *_EC2_TAGS),
    "aws:ec2/instance:Instance": (
        "ec2:RunInstances", "ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances",
        "ec2:DescribeInstances", "ec2:DescribeInstanceAttribute", "ec2:ModifyInstanceAttribute",
        "ec2:DescribeInstanceTypes", "ec2:DescribeInstanceStatus", "ec2:DescribeInstanceCreditSpecifications",
        "ec2:ModifyInstanceCreditSpecification", "ec2:ModifyInstanceMetadataOptions", "ec2:DescribeVolumes",
        "ec2:DescribeIamInstanceProfileAssociations", "ec2:AssociateIamInstanceProfile",
        "ec2:ReplaceIamInstanceProfileAssociation", "ec2:DisassociateIamInstanceProfile", "iam:PassRole",
        *_EC2_TAGS),
    "aws:ebs/volume:Volume": (
        "ec2:CreateVolume", "ec2:DeleteVolume", "ec2:DescribeVolumes", "ec2:ModifyVolume",
        "ec2:DescribeVolumesModifications", *_EC2_TAGS),
    "aws:ec2/volumeAttachment:VolumeAttachment": (
        "ec2:AttachVolume", "ec2:DetachVolume", "ec2:DescribeVolumes", "ec2:DescribeInstances"),
    # Host roles
    "aws:iam/role:Role": (
        "iam:CreateRole", "iam:DeleteRole", "iam:GetRole", "iam:UpdateRole", "iam:UpdateRoleDescription",
        "iam:UpdateAssumeRolePolicy", "iam:TagRole", "iam:UntagRole", "iam:ListRoleTags", "iam:ListRolePolicies",
        "iam:ListAttachedRolePolicies", "iam:ListInstanceProfilesForRole",
        "iam:PutRolePermissionsBoundary"),  # a boundary set on an existing role (removing one is denied)
    "aws:iam/rolePolicy:RolePolicy": (
        "iam:PutRolePolicy", "iam:GetRolePolicy", "iam:DeleteRolePolicy", "iam:ListRolePolicies"),
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": (
        "iam:AttachRolePolicy", "iam:DetachRolePolicy", "iam:ListAttachedRolePolicies"),
    "aws:iam/instanceProfile:InstanceProfile": (
        "iam:CreateInstanceProfile", "iam:DeleteInstanceProfile", "iam:GetInstanceProfile",
        "iam:AddRoleToInstanceProfile", "iam:RemoveRoleFromInstanceProfile", "iam:TagInstanceProfile",
        "iam:UntagInstanceProfile", "iam:ListInstanceProfileTags", "iam:PassRole"),
    # Secrets and host configuration
    "aws:ssm/parameter:Parameter": (
        "ssm:PutParameter", "ssm:GetParameter", "ssm:GetParameters", "ssm:DeleteParameter",
        "ssm:DescribeParameters", "ssm:AddTagsToResource", "ssm:RemoveTagsFromResource",
        "ssm:ListTagsForResource"),
    # Backups
    "aws:s3/bucket:Bucket": ("s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketTagging", *_S3_BUCKET_READ),
    "aws:s3/bucketVersioning:BucketVersioning": ("s3:PutBucketVersioning", "s3:GetBucketVersioning"),
    "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration": (
        "s3:PutLifecycleConfiguration", "s3:GetLifecycleConfiguration"),
    "aws:s3/bucketOwnershipControls:BucketOwnershipControls": (
        "s3:PutBucketOwnershipControls", "s3:GetBucketOwnershipControls"),
    "aws:s3/bucketPolicy:BucketPolicy": ("s3:PutBucketPolicy", "s3:GetBucketPolicy", "s3:DeleteBucketPolicy"),
    "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock": (
        "s3:PutBucketPublicAccessBlock", "s3:GetBucketPublicAccessBlock"),
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration": (
        "s3:PutEncryptionConfiguration", "s3:GetEncryptionConfiguration"),
    "aws:dlm/lifecyclePolicy:LifecyclePolicy": (
        "dlm:CreateLifecyclePolicy", "dlm:GetLifecyclePolicy", "dlm:UpdateLifecyclePolicy",
        "dlm:DeleteLifecyclePolicy", "dlm:TagResource", "dlm:UntagResource", "dlm:ListTagsForResource",
        "iam:PassRole"),
    # Alarms
    "aws:cloudwatch/metricAlarm:MetricAlarm": (
        "cloudwatch:PutMetricAlarm", "cloudwatch:DescribeAlarms", "cloudwatch:DeleteAlarms",
        "cloudwatch:TagResource", "cloudwatch:UntagResource", "cloudwatch:ListTagsForResource"),
    "aws:sns/topic:Topic": (
        "sns:CreateTopic", "sns:DeleteTopic", "sns:GetTopicAttributes", "sns:SetTopicAttributes",
        "sns:TagResource", "sns:UntagResource", "sns:ListTagsForResource"),
    "aws:sns/topicSubscription:TopicSubscription": (
        "sns:Subscribe", "sns:Unsubscribe", "sns:GetSubscriptionAttributes", "sns:SetSubscriptionAttributes",
        "sns:ListSubscriptionsByTopic"),
    # The SES relay (outbound.relay: ses): its events topic's policy, SES, and the SMTP user under /orgmail/.
    "aws:sns/topicPolicy:TopicPolicy": ("sns:SetTopicAttributes", "sns:GetTopicAttributes"),
    "aws:sesv2/configurationSet:ConfigurationSet": (
        "ses:CreateConfigurationSet", "ses:DeleteConfigurationSet", "ses:GetConfigurationSet",
        "ses:PutConfigurationSetReputationOptions", "ses:PutConfigurationSetSendingOptions", *_SES_TAGS),
    "aws:sesv2/configurationSetEventDestination:ConfigurationSetEventDestination": (
        "ses:CreateConfigurationSetEventDestination", "ses:UpdateConfigurationSetEventDestination",
        "ses:DeleteConfigurationSetEventDestination", "ses:GetConfigurationSetEventDestinations"),
    "aws:sesv2/emailIdentity:EmailIdentity": (
        "ses:CreateEmailIdentity", "ses:DeleteEmailIdentity", "ses:GetEmailIdentity",
        "ses:PutEmailIdentityDkimSigningAttributes", "ses:PutEmailIdentityConfigurationSetAttributes", *_SES_TAGS),
    "aws:sesv2/emailIdentityMailFromAttributes:EmailIdentityMailFromAttributes": (
        "ses:PutEmailIdentityMailFromAttributes", "ses:GetEmailIdentity"),
    "aws:iam/user:User": (
        "iam:CreateUser", "iam:DeleteUser", "iam:GetUser", "iam:UpdateUser", "iam:TagUser", "iam:UntagUser",
        "iam:ListUserTags", "iam:ListGroupsForUser", "iam:ListUserPolicies", "iam:ListAttachedUserPolicies",
        "iam:PutUserPermissionsBoundary"),  # the boundary put on an SMTP user made before it
    "aws:iam/userPolicy:UserPolicy": (
        "iam:PutUserPolicy", "iam:GetUserPolicy", "iam:DeleteUserPolicy", "iam:ListUserPolicies"),
    "aws:iam/accessKey:AccessKey": (
        "iam:CreateAccessKey", "iam:DeleteAccessKey", "iam:UpdateAccessKey", "iam:ListAccessKeys"),
    # The ISP cluster (orgmail:cluster): docs/iam/deploy-cluster-policy.json, a managed policy beside the inline one.
    "aws:lb/loadBalancer:LoadBalancer": (
        "elasticloadbalancing:CreateLoadBalancer", "elasticloadbalancing:DeleteLoadBalancer",
        "elasticloadbalancing:DescribeLoadBalancers", "elasticloadbalancing:DescribeLoadBalancerAttributes",
        "elasticloadbalancing:ModifyLoadBalancerAttributes", "elasticloadbalancing:SetSecurityGroups",
        "elasticloadbalancing:SetSubnets", *_ELB_TAGS, *_SERVICE_LINKED_ROLE),
    "aws:lb/targetGroup:TargetGroup": (
        "elasticloadbalancing:CreateTargetGroup", "elasticloadbalancing:DeleteTargetGroup",
        "elasticloadbalancing:DescribeTargetGroups", "elasticloadbalancing:DescribeTargetGroupAttributes",
        "elasticloadbalancing:ModifyTargetGroup", "elasticloadbalancing:ModifyTargetGroupAttributes", *_ELB_TAGS),
    "aws:lb/listener:Listener": (
        "elasticloadbalancing:CreateListener", "elasticloadbalancing:DeleteListener",
        "elasticloadbalancing:DescribeListeners", "elasticloadbalancing:ModifyListener", *_ELB_TAGS),
    "aws:ec2/launchTemplate:LaunchTemplate": (
        "ec2:CreateLaunchTemplate", "ec2:CreateLaunchTemplateVersion", "ec2:DeleteLaunchTemplate",
        "ec2:DescribeLaunchTemplates", "ec2:DescribeLaunchTemplateVersions", "ec2:ModifyLaunchTemplate",
        "iam:PassRole", *_EC2_TAGS),
    "aws:autoscaling/group:Group": (
        "autoscaling:CreateAutoScalingGroup", "autoscaling:UpdateAutoScalingGroup", "autoscaling:DeleteAutoScalingGroup",
        "autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeScalingActivities",
        "autoscaling:AttachLoadBalancerTargetGroups", "autoscaling:DetachLoadBalancerTargetGroups",
        "autoscaling:DescribeLoadBalancerTargetGroups", "autoscaling:StartInstanceRefresh",
        "autoscaling:CancelInstanceRefresh", "autoscaling:DescribeInstanceRefreshes",
        "autoscaling:CreateOrUpdateTags", "autoscaling:DeleteTags", "autoscaling:DescribeTags",
        # Creating a group whose launch template names a profile: the caller may run and pass it.
        "ec2:RunInstances", "ec2:DescribeLaunchTemplateVersions", "iam:PassRole", *_SERVICE_LINKED_ROLE),
    "aws:autoscaling/lifecycleHook:LifecycleHook": (
        "autoscaling:PutLifecycleHook", "autoscaling:DeleteLifecycleHook", "autoscaling:DescribeLifecycleHooks"),
    "aws:rds/subnetGroup:SubnetGroup": (
        "rds:CreateDBSubnetGroup", "rds:DeleteDBSubnetGroup", "rds:DescribeDBSubnetGroups", "rds:ModifyDBSubnetGroup",
        *_RDS_TAGS),
    "aws:rds/parameterGroup:ParameterGroup": (
        "rds:CreateDBParameterGroup", "rds:DeleteDBParameterGroup", "rds:DescribeDBParameterGroups",
        "rds:DescribeDBParameters", "rds:ModifyDBParameterGroup", *_RDS_TAGS),
    # manage_master_user_password: RDS creates and rotates the secret in Secrets Manager for the caller.
    "aws:rds/instance:Instance": (
        "rds:CreateDBInstance", "rds:DeleteDBInstance", "rds:DescribeDBInstances", "rds:ModifyDBInstance",
        "rds:RebootDBInstance", *_RDS_TAGS, "secretsmanager:CreateSecret", "secretsmanager:DescribeSecret",
        "secretsmanager:RotateSecret", "secretsmanager:TagResource", "secretsmanager:DeleteSecret",
        *_SERVICE_LINKED_ROLE),
    # The edges' shared rspamd store (components/edge_cache.py); its first replication group in an account
    # creates ElastiCache's service-linked role.
    "aws:elasticache/subnetGroup:SubnetGroup": (
        "elasticache:CreateCacheSubnetGroup", "elasticache:DeleteCacheSubnetGroup",
        "elasticache:DescribeCacheSubnetGroups", "elasticache:ModifyCacheSubnetGroup", *_ELASTICACHE_TAGS),
    "aws:elasticache/replicationGroup:ReplicationGroup": (
        "elasticache:CreateReplicationGroup", "elasticache:DeleteReplicationGroup",
        "elasticache:DescribeReplicationGroups", "elasticache:ModifyReplicationGroup",
        "elasticache:DescribeCacheClusters", *_ELASTICACHE_TAGS, *_SERVICE_LINKED_ROLE),
}

# Cloudflare resource type -> the permission groups of the deploying token ("Scope: Group: Level",
# as the dashboard's token form names them). The preview token holds the Read level of each.
CLOUDFLARE_PERMISSIONS: dict[str, tuple[str, ...]] = {
    "cloudflare:index/dnsRecord:DnsRecord": ("Zone: DNS: Edit",),
    "cloudflare:index/workersScript:WorkersScript": ("Account: Workers Scripts: Edit",),
    "cloudflare:index/workersCustomDomain:WorkersCustomDomain": (
        "Account: Workers Scripts: Edit", "Zone: Workers Routes: Edit"),
    "cloudflare:index/apiToken:ApiToken": ("User: API Tokens: Edit",),
    # orgmail:webmail: the tunnel, its ingress and its token (Cloudflare's "Create a tunnel (API)" guide:
    # Account, Cloudflare Tunnel, Edit), and the Access application and policy in front of it.
    "cloudflare:index/zeroTrustTunnelCloudflared:ZeroTrustTunnelCloudflared": ("Account: Cloudflare Tunnel: Edit",),
    "cloudflare:index/zeroTrustTunnelCloudflaredConfig:ZeroTrustTunnelCloudflaredConfig": (
        "Account: Cloudflare Tunnel: Edit",),
    "cloudflare:index/getZeroTrustTunnelCloudflaredToken:getZeroTrustTunnelCloudflaredToken": (
        "Account: Cloudflare Tunnel: Edit",),
    "cloudflare:index/zeroTrustAccessApplication:ZeroTrustAccessApplication": ("Account: Access: Apps and Policies: Edit",),
    "cloudflare:index/zeroTrustAccessPolicy:ZeroTrustAccessPolicy": ("Account: Access: Apps and Policies: Edit",),
}

# Types that call neither AWS nor Cloudflare: computed locally by their provider, the program's
# own components, and the post-deploy verifier (DNS and mail ports, no cloud API).
NO_CLOUD_API = ("orgmail:index:", "tls:index/", "random:index/", "command:local:Command", "pulumi:providers:")

# IAM actions whose name is not an API operation of botocore's service model (IAM names some S3
# permissions after the resource, not the call): action -> the operation it authorises.
IAM_ONLY_ACTIONS: dict[str, str] = {
    "iam:PassRole": "iam:GetRole",  # no call of its own: checked when a role is handed to EC2 or DLM
    "s3:ListBucket": "s3:ListObjectsV2",
    "s3:GetAccelerateConfiguration": "s3:GetBucketAccelerateConfiguration",
    "s3:GetLifecycleConfiguration": "s3:GetBucketLifecycleConfiguration",
    "s3:PutLifecycleConfiguration": "s3:PutBucketLifecycleConfiguration",
    "s3:GetReplicationConfiguration": "s3:GetBucketReplication",
    "s3:GetEncryptionConfiguration": "s3:GetBucketEncryption",
    "s3:PutEncryptionConfiguration": "s3:PutBucketEncryption",
    "s3:GetBucketObjectLockConfiguration": "s3:GetObjectLockConfiguration",
    "s3:GetObjectVersion": "s3:GetObject",  # GetObject with a VersionId
    "s3:GetBucketPublicAccessBlock": "s3:GetPublicAccessBlock",
    "s3:PutBucketPublicAccessBlock": "s3:PutPublicAccessBlock",
    # SES v2 SendEmail with raw content, and the SMTP interface, are authorised by ses:SendRawEmail.
    "ses:SendRawEmail": "ses:SendEmail",
}

# Actions only AWS's own agents call, absent from botocore's public service models: the SSM agent registers
# the instance (ssm:UpdateInstanceInformation) and opens Session Manager's channels (ssmmessages, a service
# botocore has no model for). Source: the Service Authorization Reference pages for AWS Systems Manager and
# for Amazon Message Gateway Service, and Session Manager's "minimal instance profile" policy
# (https://docs.aws.amazon.com/systems-manager/latest/userguide/getting-started-create-iam-instance-profile.html).
AGENT_ONLY_ACTIONS = (
    "ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel", "ssmmessages:OpenDataChannel",
)

# botocore's service model directory for each IAM service prefix.
BOTOCORE_SERVICE = {"ec2": "ec2", "iam": "iam", "s3": "s3", "ssm": "ssm", "dlm": "dlm", "sns": "sns",
                    "cloudwatch": "cloudwatch", "sts": "sts", "kms": "kms",
                    "ses": "sesv2", "events": "events", "elasticloadbalancing": "elbv2",
                    "autoscaling": "autoscaling", "rds": "rds", "secretsmanager": "secretsmanager",
                    "elasticache": "elasticache"}
# The policy documents of the deploy role: the inline one, and (for a cluster stack) the managed one beside it
# (IAM allows 10,240 characters of inline policy per role, 6,144 per managed policy).
DEPLOY_POLICIES = ("deploy-policy.json",)
CLUSTER_DEPLOY_POLICY = "deploy-cluster-policy.json"
# Service-linked roles the cluster's first deploy in an account creates.
SERVICE_LINKED_ROLES = ("elasticloadbalancing.amazonaws.com", "autoscaling.amazonaws.com", "rds.amazonaws.com",
                        "elasticache.amazonaws.com")

# The AWS managed policies the program attaches, as AWS publishes them (they cannot be fetched offline): the
# permissions boundary (docs/iam/boundary-policy.json) must allow every action they name, or the role they
# are attached to loses it. AWSDataLifecycleManagerServiceRole, version v8 (default; edited 2024-12-16), from
# the AWS Managed Policy Reference:
# https://docs.aws.amazon.com/aws-managed-policy/latest/reference/AWSDataLifecycleManagerServiceRole.html
MANAGED_POLICIES: dict[str, dict[str, Any]] = {
    "arn:aws:iam::aws:policy/service-role/AWSDataLifecycleManagerServiceRole": {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": [
                "ec2:CreateSnapshot", "ec2:CreateSnapshots", "ec2:DeleteSnapshot", "ec2:DescribeInstances",
                "ec2:DescribeVolumes", "ec2:DescribeSnapshots", "ec2:EnableFastSnapshotRestores",
                "ec2:DescribeFastSnapshotRestores", "ec2:DisableFastSnapshotRestores", "ec2:CopySnapshot",
                "ec2:ModifySnapshotAttribute", "ec2:DescribeSnapshotAttribute", "ec2:DescribeSnapshotTierStatus",
                "ec2:ModifySnapshotTier", "ec2:DescribeAvailabilityZones"], "Resource": "*"},
            {"Effect": "Allow", "Action": ["ec2:CreateTags"], "Resource": "arn:aws:ec2:*::snapshot/*"},
            {"Effect": "Allow", "Action": [
                "events:PutRule", "events:DeleteRule", "events:DescribeRule", "events:EnableRule",
                "events:DisableRule", "events:ListTargetsByRule", "events:PutTargets", "events:RemoveTargets"],
             "Resource": "arn:aws:events:*:*:rule/AwsDataLifecycleRule.managed-cwe.*"},
        ],
    },
}

# The IAM actions that support the condition key iam:PermissionsBoundary ("Filters access if the specified
# policy is set as the permissions boundary on the IAM entity (user or role)"), from the Service Authorization
# Reference, "Actions, resources, and condition keys for AWS Identity and Access Management (IAM)":
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_awsidentityandaccessmanagementiam.html
# (its Actions table lists iam:PermissionsBoundary, beside iam:PolicyARN, for AttachRolePolicy and
# AttachUserPolicy, and for the others below; CreateInstanceProfile, PassRole, TagRole and
# UpdateAssumeRolePolicy have no such key). A statement that names any other action with this condition
# would never match it, so the deploy policy keeps CreateInstanceProfile in a statement of its own.
BOUNDARY_CONDITION_ACTIONS = (
    "iam:AttachRolePolicy", "iam:AttachUserPolicy", "iam:CreateRole", "iam:CreateUser",
    "iam:DeleteRolePermissionsBoundary", "iam:DeleteRolePolicy", "iam:DeleteUserPermissionsBoundary",
    "iam:DeleteUserPolicy", "iam:DetachRolePolicy", "iam:DetachUserPolicy", "iam:PutRolePermissionsBoundary",
    "iam:PutRolePolicy", "iam:PutUserPermissionsBoundary", "iam:PutUserPolicy",
)

GITHUB_OIDC = "token.actions.githubusercontent.com"


def unmapped(types: Iterable[str]) -> list[str]:
    """The types and invoke tokens of a plan that no table here accounts for."""
    return sorted(t for t in set(types)
                  if t not in AWS_ACTIONS and t not in CLOUDFLARE_PERMISSIONS and not t.startswith(NO_CLOUD_API))


def required_actions(types: Iterable[str]) -> dict[str, set[str]]:
    """IAM action -> the types that need it."""
    need: dict[str, set[str]] = {}
    for t in set(types):
        for action in AWS_ACTIONS.get(t, ()):
            need.setdefault(action, set()).add(t)
    return need


def load_policy(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((IAM_DIR / name).read_text())
    return doc


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


@dataclass(frozen=True)
class Request:
    action: str
    resource: str = "*"


def _matches(patterns: list[str], value: str, case_sensitive: bool) -> bool:
    if case_sensitive:
        return any(fnmatch.fnmatchcase(value, p) for p in patterns)
    return any(fnmatch.fnmatchcase(value.lower(), p.lower()) for p in patterns)


def statement_matches(statement: dict[str, Any], request: Request) -> bool:
    """Whether Action/NotAction and Resource/NotResource cover the request (conditions not evaluated).

    A request for resource "*" stands for "any resource of this action": only a statement on "*"
    covers it.
    """
    if "Action" in statement:
        action_ok = _matches(_listed(statement["Action"]), request.action, case_sensitive=False)
    else:
        action_ok = not _matches(_listed(statement["NotAction"]), request.action, case_sensitive=False)
    if "Resource" in statement:
        resources = _listed(statement["Resource"])
        resource_ok = "*" in resources if request.resource == "*" else _matches(resources, request.resource, True)
    else:
        resource_ok = not _matches(_listed(statement["NotResource"]), request.resource, True)
    return action_ok and resource_ok


def allowing(policy: dict[str, Any], request: Request) -> list[dict[str, Any]]:
    return [s for s in policy["Statement"] if s["Effect"] == "Allow" and statement_matches(s, request)]


def denying(policy: dict[str, Any], request: Request) -> list[dict[str, Any]]:
    return [s for s in policy["Statement"] if s["Effect"] == "Deny" and statement_matches(s, request)]


def action_patterns(policy: dict[str, Any]) -> list[str]:
    return [a for s in policy["Statement"] for a in _listed(s.get("Action", s.get("NotAction", [])))]


@functools.cache
def botocore_operations(service: str) -> frozenset[str]:
    """Operation names of one service in botocore's bundled service model (offline)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model(BOTOCORE_SERVICE[service])
    return frozenset(model.operation_names)


def known_action(action: str) -> bool:
    """Whether an IAM action (or pattern with *) names at least one botocore operation or listed IAM-only action."""
    if any(fnmatch.fnmatchcase(a.lower(), action.lower()) for a in AGENT_ONLY_ACTIONS):
        return True
    service, _, name = action.partition(":")
    if service not in BOTOCORE_SERVICE or not name:
        return False
    names = {op.lower() for op in botocore_operations(service)}
    names |= {a.partition(":")[2].lower() for a in IAM_ONLY_ACTIONS if a.startswith(service + ":")}
    return any(fnmatch.fnmatchcase(n, name.lower()) for n in names)
